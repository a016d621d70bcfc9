"""Recovery after pruning, and prune -> distill, on the real stories260K (bench/RESULTS.md `## compress`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/recover.py --steps 300            # ~10 min on one loaded core
    OMP_NUM_THREADS=1 .venv/bin/python bench/recover.py --only recover --steps 1000

1. ``recover``: stories260K with 25% of its heads (one KV group of 4 per layer) and 25% of its FFN neurons
   removed (activation scores, 16 x 128 calibration tokens of the training text), then trained ``--steps``
   steps of 8 x 256 tokens on ``tinystories_train_first2MiB.txt``: plain next-token loss (``init_from``,
   ``lmstack compress prune --recover-steps``) and distillation from the unpruned model (``objective =
   "distill"`` + ``init_from``). Held-out: 20 batches of 8 x 256 tokens of ``tinystories_valid_sample.txt``.
2. ``distill``: a 2-block student (stories260K has 5) with the same token budget each: distilled from the
   pruned teacher (3 blocks dropped by Block Influence, ``--layers 3 --score activation``), distilled from a
   random init of the same shape, trained from scratch (random init, next-token loss); and the pruned start
   with the plain next-token loss.

fp32, one thread, seed 1337, AdamW with the trainer's defaults; lr 1e-3 from a trained start, 3e-3 from random.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEACHER = SHARED / "models" / "stories260K"
TEXT = SHARED / "text" / "tinystories"
TRAIN, VALID = TEXT / "tinystories_train_first2MiB.txt", TEXT / "tinystories_valid_sample.txt"


def prune(out: Path, *flags: str) -> Path:
    from lmstack.cli import main

    assert main(["compress", "prune", str(TEACHER), *flags, "--calib", str(TRAIN), "--calib-seqs", "16",
                 "--format", "lmstack", "--out", str(out)]) == 0
    return out


def train(run: Path, steps: int, lr: float, objective: str = "clm", init: Path | None = None,
          shape: dict | None = None) -> dict:
    from lmstack.train.config import TrainConfig
    from lmstack.train.trainer import pretrain

    fields = dict(objective=objective, teacher=str(TEACHER) if objective == "distill" else "",
                  init_from=str(init) if init else "", model={} if init else shape)
    cfg = TrainConfig(run_dir=str(run), steps=steps, batch_size=8, eval_every=0, ckpt_every=0, sample_prompts=[],
                      threads=1, dtype="fp32", log_every=50, eval_batches=20, **fields,
                      data={"train": [str(TRAIN)], "valid": [str(VALID)], "seq_len": 256, "tokenizer": str(TEACHER)},
                      optim={"lr": lr, "warmup_steps": max(1, min(50, steps // 10))})
    t = time.perf_counter()
    s = pretrain(cfg)
    return {"val_loss": s["val_loss"], "val_ppl": s["val_ppl"], "params": s["params_total"], "tokens": s["tokens"],
            "seconds": round(time.perf_counter() - t, 1)}


def held_out(folder: Path, run: Path) -> float:
    """Perplexity of a model folder on the same held-out batches, before any training."""
    from lmstack.train.recover import recovery_config
    from lmstack.train.trainer import Trainer

    trainer = Trainer(recovery_config(folder, [str(TRAIN)], [str(VALID)], steps=1, run_dir=run, eval_batches=20,
                                      threads=1, dtype="fp32"))
    try:
        return trainer.evaluate()["val_ppl"]
    finally:
        trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--only", choices=["recover", "distill"], default=None)
    args = p.parse_args()
    from lmstack.config import to_dict
    from lmstack.model import load

    root = Path(tempfile.mkdtemp(prefix="lmstack-recover-"))
    rows: list[tuple[str, dict]] = []
    try:
        rows.append(("unpruned stories260K", {"val_ppl": held_out(TEACHER, root / "e0")}))
        if args.only in (None, "recover"):
            hn = prune(root / "hn", "--heads", "0.25", "--neurons", "0.25", "--score", "activation")
            rows.append(("25% heads + 25% neurons, no recovery", {"val_ppl": held_out(hn, root / "e1")}))
            rows.append((f"  + {args.steps} steps next-token recovery", train(root / "r1", args.steps, 1e-3, init=hn)))
            rows.append((f"  + {args.steps} steps distillation recovery",
                         train(root / "r2", args.steps, 1e-3, "distill", init=hn)))
        if args.only in (None, "distill"):
            half = prune(root / "half", "--layers", "3", "--score", "activation")
            shape = dict(to_dict(load(half).config))
            rows.append(("5 -> 2 blocks (Block Influence), no training", {"val_ppl": held_out(half, root / "e2")}))
            rows.append(("  distilled from the pruned teacher", train(root / "d1", args.steps, 1e-3, "distill", half)))
            rows.append(("  next-token loss from the pruned teacher", train(root / "d2", args.steps, 1e-3, init=half)))
            rows.append(("2 blocks, random init, distilled", train(root / "d3", args.steps, 3e-3, "distill",
                                                                     shape=shape)))
            rows.append(("2 blocks, random init, from scratch", train(root / "d4", args.steps, 3e-3, shape=shape)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| model | held-out ppl | tokens | seconds |\n| --- | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['val_ppl']:.3f} | {r.get('tokens', '-')} | {r.get('seconds', '-')} |")
    print(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
