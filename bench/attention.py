"""Attention: SDPA (flash / memory-efficient kernels) vs the explicit reference path softmax(QK^T/sqrt(d))V.

Causal self-attention, B=1, H=8, head_dim=64, fp32 on CPU (bf16 on CUDA), forward+backward, at
T = 512..4096. Each (impl, T) runs in a fresh subprocess so that its peak memory is its own: peak RSS
growth on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Prints median times of several repeats
and the ratio reference/SDPA (> 1: SDPA is faster / smaller).

    .venv/bin/python bench/attention.py                  # CPU (and CUDA too when available)
    .venv/bin/python bench/attention.py --lengths 512 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def one(impl: str, t: int, device: str, repeats: int) -> dict:
    from lmstack.model.layers import attention

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 8, t, 64, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))

    def step() -> None:
        out = attention(q, k, v, is_causal=True, impl=impl)
        out.sum().backward()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()  # warm-up, and the peak-memory measurement
    sync()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    fwd, both = [], []
    for _ in range(repeats):
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            attention(q, k, v, is_causal=True, impl=impl)
            sync()
            fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step()
        sync()
        both.append(time.perf_counter() - t0)
    return {"fwd_ms": 1e3 * statistics.median(fwd), "fwd_bwd_ms": 1e3 * statistics.median(both), "peak_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "T", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, t, device = args.one
        print(json.dumps(one(impl, int(t), device, args.repeats)))
        return
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}; causal, B=1, H=8, D=64, fwd+bwd; median of {args.repeats}")
    print("| device | T | SDPA fwd ms | ref fwd ms | SDPA fwd+bwd ms | ref fwd+bwd ms | ratio ref/SDPA (fwd+bwd) "
          "| SDPA peak MB | ref peak MB | ratio ref/SDPA (mem) |")
    print("|" + " --- |" * 10)
    for device in devices:
        for t in args.lengths:
            res = {}
            for impl in ("sdpa", "reference"):
                out = subprocess.run([sys.executable, __file__, "--one", impl, str(t), device, "--repeats",
                                      str(args.repeats)], capture_output=True, text=True, check=True)
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            s, r = res["sdpa"], res["reference"]
            print(f"| {device} | {t} | {s['fwd_ms']:.1f} | {r['fwd_ms']:.1f} | {s['fwd_bwd_ms']:.1f} | "
                  f"{r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_ms'] / s['fwd_bwd_ms']:.2f} | {s['peak_mb']:.0f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / max(s['peak_mb'], 1e-9):.1f} |", flush=True)


if __name__ == "__main__":
    main()
