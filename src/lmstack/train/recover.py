"""Recovery fine-tuning: a pruned (or otherwise damaged) model trained a little more on plain text, through the
one trainer (``TrainConfig.init_from``), so it wins back most of what pruning cost.

    from lmstack.train.recover import recover
    model, info = recover("runs/pruned", ["train.txt"], valid=["valid.txt"], steps=300)
    info  # {"steps": 300, "val_loss_before": 2.78, "val_loss_after": 1.52, "val_ppl_before": ..., "run_dir": ...}

It is causal-LM training of every weight (``objective = "clm"``) started from the folder's weights; the
held-out loss is measured before the first step and after the last, on the same batches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from lmstack.errors import ConfigError


def recovery_config(folder: str | Path, train: list[str], valid: list[str] | None = None, steps: int = 200,
                    run_dir: str | Path | None = None, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 256,
                    seed: int = 1337, **fields: Any):
    """The ``TrainConfig`` of a recovery run: ``init_from = folder``, short warmup, cosine decay, evaluated at the
    end only, no samples. ``fields`` set any other TrainConfig field (e.g. ``dtype="fp32"``, ``eval_batches``)."""
    from lmstack.train.config import TrainConfig

    if not train:
        raise ConfigError("recover: name the text to fine-tune on (--recover-text FILES)")
    folder = Path(folder)
    run = Path(run_dir) if run_dir is not None else folder.parent / f"{folder.name}-recovery"
    data = {"train": [str(p) for p in train], "valid": [str(p) for p in (valid or [])], "seq_len": seq_len}
    optim = {"lr": lr, "warmup_steps": max(1, min(50, steps // 10))}
    base: dict[str, Any] = dict(run_dir=str(run), init_from=str(folder), model={}, steps=steps,
                                batch_size=batch_size, seed=seed, eval_every=0, ckpt_every=0, sample_prompts=[],
                                log_every=max(1, steps // 10))
    base.update(fields)
    return TrainConfig(**base, data=data, optim=optim)


def recover(folder: str | Path, train: list[str], valid: list[str] | None = None, steps: int = 200,
            run_dir: str | Path | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune the model in ``folder`` for ``steps`` steps on ``train`` text (see :func:`recovery_config`).

    Returns the trained model (fp32, eval mode) and ``{"steps", "tokens", "val_loss_before", "val_loss_after",
    "val_ppl_before", "val_ppl_after", "run_dir"}`` (the val figures are None without a held-out set: give
    ``valid``, since a single .txt file is one document and the held-out rule splits by document). The run
    directory holds the usual training run (metrics.jsonl, loss.png, the final model)."""
    from lmstack.train.trainer import Trainer

    cfg = recovery_config(folder, train, valid, steps, run_dir, **kwargs)
    trainer = Trainer(cfg)
    try:
        before = trainer.evaluate().get("val_loss")
        summary = trainer.fit()
        model = trainer.full_model()
    finally:
        trainer.close()
    after = summary.get("val_loss")
    info = {"steps": summary["steps"], "tokens": summary["tokens"], "lr": cfg.optim.lr,
            "val_loss_before": before, "val_loss_after": after,
            "val_ppl_before": math.exp(min(before, 50.0)) if before is not None else None,
            "val_ppl_after": math.exp(min(after, 50.0)) if after is not None else None,
            "run_dir": str(cfg.run_dir)}
    return model.cpu().eval(), info
