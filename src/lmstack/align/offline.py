"""What the offline runs (reward model, DPO, KTO) share: the base and tokenizer, the data, the reference
model (a frozen copy, or with LoRA the base itself with the adapter disabled), cached reference log-probs,
the trainer config, and the report with curves.

Each run is ``Trainer(train_config(...), task=Task(model, loader, ..., loss_fn=..., evaluate=...)).fit()``:
the one training loop, with the method's loss and held-out metrics supplied through the Task hook.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.align.config import AlignConfig
from lmstack.align.logps import sequence_logps
from lmstack.errors import ConfigError
from lmstack.runs import atomic_write_json, atomic_write_text

# the metrics every run's curves show, when its log has them
CURVES = (("loss", "val_loss"), ("rewards_chosen", "rewards_rejected", "val_rewards_chosen", "val_rewards_rejected"),
          ("margin", "val_margin"), ("accuracy", "val_accuracy"))


def load_policy(cfg: AlignConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """(base model in fp32 on ``device``, tokenizer): the fine-tuning layer's loaders."""
    from lmstack.finetune.run import load_base, load_sft_tokenizer

    tokenizer = load_sft_tokenizer(cfg)       # reads cfg.base / cfg.tokenizer only
    model = load_base(cfg.base, device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer: {tokenizer.vocab_size} ids but the base model has vocab_size="
                          f"{model.config.vocab_size}; use the tokenizer the base was trained with")
    return model, tokenizer


@dataclass
class RunStart:
    """What an offline run has once it started: its folder, device, policy, tokenizer and data."""

    run: Path
    device: torch.device
    model: nn.Module
    tokenizer: Any
    train: list
    held: list
    stats: dict[str, Any]
    pad: int


def start_run(cfg: AlignConfig, kind: str) -> RunStart:
    """The start every offline run shares: create the run folder, seed, load the policy and its tokenizer (saved
    into the run), read the data (``kind``: ``"pairs"`` or ``"unpaired"``, see :func:`load_items`)."""
    from lmstack.runtime import resolve_device, seed_everything

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, tok = load_policy(cfg, device)
    tok.save(run)
    train, held, stats = load_items(cfg, tok, kind)
    return RunStart(run, device, model, tok, train, held, stats, pad_id(tok))


def apply_method(model: nn.Module, cfg: AlignConfig) -> dict[str, Any]:
    """Full fine-tuning or LoRA, by the fine-tuning layer's one function."""
    from lmstack.finetune.run import apply_method as apply

    return apply(model, cfg.method, cfg)


def load_items(cfg: AlignConfig, tokenizer: Any, kind: str) -> tuple[list, list, dict[str, Any]]:
    """(train, held-out, stats) of pairs (``kind="pairs"``) or unpaired examples (``"unpaired"``)."""
    from lmstack.align.data import load_pairs, load_unpaired, split_heldout

    load = load_pairs if kind == "pairs" else load_unpaired
    d = cfg.data
    if not d.train:
        raise ConfigError("data.train: name the preference files (JSONL/JSON/Parquet)")
    train, stats = load(d.train, tokenizer, d.max_len, d.max_examples)
    if d.valid:
        held, vstats = load(d.valid, tokenizer, d.max_len, d.max_valid)
        stats["valid"] = vstats
    else:
        train, held = split_heldout(train, d.valid_fraction, cfg.seed)
        held = held[: d.max_valid] if d.max_valid else held
    stats.update(train_items=len(train), heldout_items=len(held))
    return train, held, stats


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: a deep copy with no gradients, in eval mode."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@contextlib.contextmanager
def reference(policy: nn.Module, ref_model: nn.Module | None) -> Iterator[nn.Module]:
    """The reference to score with: ``ref_model`` when there is one, else the policy with its LoRA adapters
    disabled (no second copy); always without gradients."""
    from lmstack.finetune.lora import adapters_disabled

    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with adapters_disabled(policy) as base:
                yield base


@torch.no_grad()
def cached_logps(model: nn.Module, items: list, batch_size: int, pad: int, device: torch.device,
                 average: bool = False) -> list[tuple[float, float]]:
    """Per item, the two sequence log-probs a batch holds for it (pair: chosen, rejected; KTO: the
    example, its mismatched KL pair), computed once: the reference's cache, or held-out scoring."""
    from lmstack.align.data import fixed_batches

    was = model.training
    model.eval()
    out: list[tuple[float, float] | None] = [None] * len(items)
    for idx, (x, y) in fixed_batches(items, batch_size, pad):
        lp = sequence_logps(model, x["input_ids"].to(device), y["labels"].to(device), average=average).cpu()
        b = len(idx)
        for k, i in enumerate(idx):
            out[i] = (float(lp[k]), float(lp[b + k]))
    model.train(was)
    return out  # type: ignore[return-value]


def train_config(cfg: AlignConfig, run: Path, n_held: int, vocab_size: int):
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig

    return TrainConfig(run_dir=str(run), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, steps=cfg.steps,
                       batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                       eval_every=cfg.eval_every, eval_batches=max(1, n_held), ckpt_every=cfg.ckpt_every,
                       sample_prompts=[], model={"vocab_size": vocab_size},
                       data=DataConfig(seq_len=cfg.data.max_len),
                       optim=OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                         warmup_steps=min(cfg.warmup_steps, cfg.steps), schedule=cfg.schedule))


def weight_io(cfg: AlignConfig, base_config: dict[str, Any], fingerprint: str
              ) -> tuple[Callable[[nn.Module, Path], None], Callable[[nn.Module, Path], None]]:
    """(save, load) for checkpoints and the run folder: the whole model (full) or the adapter (LoRA),
    as fine-tuning runs write them, so ``lmstack finetune merge`` and ``load_run`` read them."""
    from lmstack.finetune.lora import load_adapter_state
    from lmstack.finetune.run import save_adapter

    def save(m: nn.Module, folder: Path) -> None:
        if cfg.method == "full":
            from lmstack.model import save as save_model

            save_model(m, folder)
        else:
            save_adapter(m, folder, cfg, base_config, fingerprint)

    def load(m: nn.Module, folder: Path) -> None:
        from safetensors.torch import load_file, load_model

        if cfg.method == "full":
            load_model(m, str(folder / "model.safetensors"))
        else:
            load_adapter_state(m, load_file(str(folder / "adapter.safetensors")))

    return save, load


def fit(tcfg: Any, task: Any) -> tuple[dict[str, Any], float]:
    """Train through the one trainer; (its summary, seconds)."""
    from lmstack.train.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(tcfg, task=task)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return summary, time.perf_counter() - t0


def plot_curves(rows: list[dict[str, Any]], path: Path, groups=CURVES) -> Path | None:
    """One panel per metric group (train per logged step, held-out per eval) into one PNG."""
    groups = [g for g in groups if any(k in r for r in rows for k in g)]
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.runs import save_figure

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if k.startswith("val_") else "-", label=k, lw=1.2, ms=3)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def finish(run: Path, results: dict[str, Any], report: str) -> None:
    """summary.json, report.md and curves.png of a run (the trainer already wrote metrics.jsonl)."""
    from lmstack.train.trainer import read_metrics

    curves = plot_curves(read_metrics(run / "metrics.jsonl"), run / "curves.png")
    if curves is not None:
        results["curves"] = str(curves)
        report += "\n![curves](curves.png)\n"
    atomic_write_json(run / "summary.json", results)
    atomic_write_text(run / "report.md", report)


def announce(msg: str) -> None:
    print(f"[align] {msg}", file=sys.stderr)
