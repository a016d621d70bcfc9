"""Trainer throughput and MFU: our trainer's step around our model vs around Hugging Face's GPT-2, one run.

Both sides run *the same loop*: :meth:`lmstack.train.trainer.Trainer.train_step` (loader, autocast,
backward, clip, LR schedule, fused AdamW), once with our decoder and once with ``GPT2LMHeadModel`` (a
thin adapter gives it our ``model(x, targets=y) -> (logits, loss)`` call). The HF model is built
randomly from a GPT-2 config, and our model is loaded from it, so both start from the same weights
and see the same batches: their losses must agree, which the table shows. Steps are interleaved
(ours, HF, ours, ...), medians of ``--steps`` timed steps after a warm-up.

MFU = FLOPs/token (6N + attention, :meth:`ModelConfig.flops_per_token`) x tokens/s / peak, with the
peak measured in the same run as a square matmul of the same dtype. Memory: peak RSS growth of a
fresh process running two steps, with and without activation checkpointing (CUDA: max allocated).

    .venv/bin/python bench/train.py                         # fp32 and bf16, batch 8 x 256
    .venv/bin/python bench/train.py --dtypes bf16 --steps 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_config(seq: int):
    import transformers as t

    return t.GPT2Config(vocab_size=8192, n_embd=256, n_layer=6, n_head=8, n_positions=seq, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def write_shards(path: Path, vocab: int, tokens: int = 400_000) -> Path:
    from lmstack.data.pack import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(path, vocab_size=vocab, eos_id=2) as w:
        for _ in range(tokens // 1000):
            w.add(rng.integers(3, vocab, 999))
    return path


def train_config(run: Path, shards: Path, args, dtype: str, ac: bool = False):
    from lmstack.train.config import DataConfig, DistConfig, OptimConfig, TrainConfig

    return TrainConfig(run_dir=str(run), device=args.device, dtype=dtype, steps=1000, batch_size=args.batch,
                       log_every=1000, eval_every=0, ckpt_every=0, sample_prompts=[], peak_tflops=1.0,
                       activation_checkpointing=ac,
                       model={"preset": "gpt2-124m", "vocab_size": 8192, "d_model": 256, "n_layer": 6, "n_head": 8,
                              "max_seq_len": args.seq},
                       optim=OptimConfig(lr=1e-3, warmup_steps=10),
                       data=DataConfig(train=[str(shards)], seq_len=args.seq, workers=1),
                       dist=DistConfig())


class HFAdapter(nn.Module):
    """Gives a HF causal LM our call: ``model(x, targets=y) -> (logits, loss)`` with the same fp32 CE."""

    def __init__(self, hf_model: nn.Module, config):
        super().__init__()
        self.hf = hf_model
        self.config = config

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        from lmstack.model.decoder import lm_loss

        logits = self.hf(input_ids=x).logits
        return logits if targets is None else (logits, lm_loss(logits, targets))


def use_hf_model(trainer, hf_model: nn.Module) -> None:
    """Swap the model inside a Trainer (single process), keeping everything else of the loop."""
    from lmstack.train.optim import build_optimizer

    adapter = HFAdapter(hf_model.to(trainer.device).train(), trainer.model_cfg)
    trainer.module = trainer.forward_model = adapter
    trainer.optimizer = build_optimizer(adapter, trainer.cfg.optim)
    trainer.params = [p for p in adapter.parameters() if p.requires_grad]


def timed_step(trainer) -> tuple[float, float]:
    from lmstack.runtime import _sync

    _sync(trainer.device)
    t0 = time.perf_counter()
    loss, _ = trainer.train_step()
    value = float(loss)
    _sync(trainer.device)
    return time.perf_counter() - t0, value


def throughput(args, shards: Path, tmp: Path) -> list[dict]:
    import transformers

    from lmstack.model import hf
    from lmstack.train.trainer import Trainer, measure_matmul_peak

    rows = []
    for dtype in args.dtypes:
        torch.manual_seed(0)
        ref = transformers.GPT2LMHeadModel(hf_config(args.seq))
        ref.config._attn_implementation = "sdpa"
        ref.save_pretrained(tmp / "hf")
        ours_t = Trainer(train_config(tmp / f"ours_{dtype}", shards, args, dtype))
        ours_t.module.load_state_dict(hf.load(tmp / "hf").state_dict())     # the same initial weights
        hf_t = Trainer(train_config(tmp / f"hf_{dtype}", shards, args, dtype))
        use_hf_model(hf_t, ref)
        peak = measure_matmul_peak(ours_t.device, ours_t.amp_dtype)
        timed_step(ours_t), timed_step(hf_t)                                 # warm-up (also step 1 of both)
        t_ours, t_hf, l_ours, l_hf = [], [], [], []
        for _ in range(args.steps):
            a, la = timed_step(ours_t)
            b, lb = timed_step(hf_t)
            t_ours += [a]
            t_hf += [b]
            l_ours += [la]
            l_hf += [lb]
        tokens = args.batch * args.seq
        fpt = ours_t.flops_per_token
        for name, times, losses in (("lmstack", t_ours, l_ours), ("HF GPT-2", t_hf, l_hf)):
            tps = tokens / statistics.median(times)
            rows.append({"dtype": dtype, "model": name, "tok_s": tps, "mfu": fpt * tps / peak, "peak": peak,
                         "loss": losses[-1], "max_loss_diff": max(abs(a - b) for a, b in zip(l_ours, l_hf))})
        for t in (ours_t, hf_t):
            t.close()
    return rows


def memory_child(args) -> None:
    """Run two steps in this (fresh) process and print the peak memory growth as JSON."""
    from lmstack.train.trainer import Trainer

    torch.set_num_threads(2)
    tmp = Path(args.tmp)
    trainer = Trainer(train_config(tmp / f"mem_{args.dtypes[0]}_{args.ac}", Path(args.shards), args, args.dtypes[0],
                                   ac=bool(args.ac)))
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the peak below is
    # that of the training steps alone, not of start-up
    reset = Path("/proc/self/clear_refs")
    if reset.exists():
        reset.write_text("5")
    base_rss = _status_kb("VmRSS") if reset.exists() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:   # bytes autograd keeps for backward, each storage once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    trainer.train_step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    if trainer.device.type == "cuda":
        grown = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_kb("VmHWM") if reset.exists() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grown = (peak - base_rss) / 1024
    print(json.dumps({"mb": grown, "saved_mb": sum(saved.values()) / 2**20}))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory(args, shards: Path, tmp: Path) -> list[dict]:
    rows = []
    for dtype in args.dtypes:
        for ac in (0, 1):
            cmd = [sys.executable, __file__, "--memory-child", "--ac", str(ac), "--dtypes", dtype, "--shards",
                   str(shards), "--tmp", str(tmp), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append({"dtype": dtype, "ac": bool(ac), **json.loads(out)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.memory_child:
        memory_child(args)
        return
    import transformers

    with tempfile.TemporaryDirectory(prefix="lmstack-bench-train-") as d:
        tmp = Path(d)
        shards = write_shards(tmp / "shards", 8192)
        print(f"torch {torch.__version__}, transformers {transformers.__version__}; {args.device}, "
              f"{torch.get_num_threads()} threads; GPT-2 config 6L d256 8h vocab 8192; batch {args.batch} x {args.seq};"
              f" Trainer.train_step, median of {args.steps} interleaved steps")
        rows = throughput(args, shards, tmp)
        print("\n| dtype | model | tokens/s | MFU | matmul peak GFLOP/s | ratio ours/HF | loss after "
              f"{args.steps + 1} steps | max loss diff |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i in range(0, len(rows), 2):
            ours, ref = rows[i], rows[i + 1]
            for r in (ours, ref):
                ratio = f"{ours['tok_s'] / ref['tok_s']:.2f}" if r is ours else ""
                print(f"| {r['dtype']} | {r['model']} | {r['tok_s']:,.0f} | {r['mfu']:.1%} | {r['peak'] / 1e9:,.0f} | "
                      f"{ratio} | {r['loss']:.4f} | {r['max_loss_diff']:.1e} |")
        if not args.no_memory:
            mem = memory(args, shards, tmp)
            unit = "max allocated" if args.device.startswith("cuda") else "peak RSS growth"
            print(f"\n| dtype | activation checkpointing | saved for backward (MB) | {unit} over 2 steps (MB) |")
            print("| --- | --- | ---: | ---: |")
            for r in mem:
                print(f"| {r['dtype']} | {'on' if r['ac'] else 'off'} | {r['saved_mb']:,.0f} | {r['mb']:,.0f} |")


if __name__ == "__main__":
    main()
