"""Attention: SDPA (flash / memory-efficient kernels) vs the explicit reference path softmax(QK^T/sqrt(d))V.

Causal self-attention, B=1, H=8, head_dim=64, fp32 on CPU (bf16 on CUDA), forward+backward, at
T = 512..4096. Each (impl, T) runs in a fresh subprocess so that its peak memory is its own: peak RSS
growth on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Prints median times of several repeats
and the ratio reference/SDPA (> 1: SDPA is faster / smaller).

    .venv/bin/python bench/attention.py                  # CPU (and CUDA too when available)
    .venv/bin/python bench/attention.py --lengths 512 1024 --repeats 3

``--section window``: sliding-window attention (``ModelConfig.sliding_window``) in a small decoder (4 layers,
d_model 256, 8 heads, 2 KV heads, RoPE, fp32, CPU, 2 threads), each cell in a fresh subprocess:

- full forward over T = 4096 and 8192 tokens, window none vs 512: median time, peak RSS growth, and the bytes
  of the window mask the forward builds once (a long input attends in query blocks of max(W, 128), whose
  block mask is (block, block + W - 1): SDPA does not skip the masked part of a dense mask, the blocks do);
- cached decode far past the window (a 64-token prompt, 4032 new tokens, greedy, through ``stream``):
  tokens/s (from the median step time of the second half, and the mean over all steps) and KV-cache bytes for full attention, the windowed model over a full cache (its layers read
  only the last W keys), the windowed model with a rolling W-slot cache (``GenerationConfig.sliding_window``,
  exact for it), and full attention streamed through W slots with 4 attention sinks.

    .venv/bin/python bench/attention.py --section window
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


WINDOW_MODEL = dict(vocab_size=4096, d_model=256, n_layer=4, n_head=8, n_kv_head=2, max_seq_len=8192)


def _window_model(window: int | None):
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", **WINDOW_MODEL, sliding_window=window)).eval()


def one_forward(t: int, window: int | None, repeats: int) -> dict:
    torch.set_num_threads(2)
    model = _window_model(window)
    ids = torch.randint(0, WINDOW_MODEL["vocab_size"], (1, t), generator=torch.Generator().manual_seed(0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):                         # the first is the warm-up and the peak-memory run
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    inp, _ = model.attn_inputs(t, None, None, None, ids.device)   # the mask the forward builds, once
    mask = inp.window_mask.numel() * inp.window_mask.element_size() if inp.window_mask is not None else 0
    return {"ms": 1e3 * statistics.median(times[1:]), "peak_mb": peak / 2**20, "mask_mb": mask / 2**20}


def one_decode(mode: str, window: int, prompt: int, new: int) -> dict:
    from lmstack.infer import GenerationConfig, generate_result, stream

    torch.set_num_threads(2)
    model = _window_model(None if mode in ("full", "sinks") else window)
    ids = torch.randint(0, WINDOW_MODEL["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=new, eos_token_id=None)
    if mode == "rolling":
        cfg = cfg.replace(sliding_window=window)
    elif mode == "sinks":
        cfg = cfg.replace(sliding_window=window, attention_sinks=4)
    generate_result(model, ids, cfg.replace(max_new_tokens=16))         # warm-up (first-call allocations)
    steps, t0 = [], time.perf_counter()
    for _ in stream(model, ids, cfg):                                   # one yield per decode step
        now = time.perf_counter()
        steps.append(now - t0)
        t0 = now
    # the median step of the second half (positions far past the window): robust to other jobs' bursts
    tail = statistics.median(steps[len(steps) // 2:])
    slots = window if mode in ("rolling", "sinks") else prompt + new
    return {"tok_s": 1.0 / tail, "new": len(steps), "mean_tok_s": len(steps) / sum(steps[1:] or [1.0]),
            "kv_mb": slots * model.config.kv_cache_bytes_per_token(torch.float32) / 2**20}


def _sub(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def window_section(args: argparse.Namespace) -> None:
    w = args.window
    print(f"torch {torch.__version__}; decoder {WINDOW_MODEL}, fp32, CPU, 2 threads; window {w}")
    print(f"\nfull forward (no grad), median of {args.repeats}:\n")
    print("| T | window | forward ms | peak RSS growth MB | window mask MB (built once) |")
    print("|" + " --- |" * 5)
    for t in args.window_lengths:
        for win in (None, w):
            r = _sub("--one-forward", str(t), str(win or 0), "--repeats", str(args.repeats))
            print(f"| {t} | {win or 'none'} | {r['ms']:.0f} | {r['peak_mb']:.0f} | {r['mask_mb']:.2f} |", flush=True)
    print(f"\ncached greedy decode, prompt {args.prompt}, {args.new} new tokens (positions up to "
          f"{args.prompt + args.new}):\n")
    print("| attention | cache | tok/s (median step, 2nd half) | tok/s (mean, all steps) | KV cache MB |")
    print("|" + " --- |" * 5)
    labels = {"full": ("full", "full"), "windowed": (f"window {w}", "full (keys sliced to W)"),
              "rolling": (f"window {w}", f"rolling, {w} slots"), "sinks": ("full", f"{w} slots, 4 sinks")}
    for mode in ("full", "windowed", "rolling", "sinks"):
        r = _sub("--one-decode", mode, str(w), str(args.prompt), str(args.new))
        print(f"| {labels[mode][0]} | {labels[mode][1]} | {r['tok_s']:.0f} | {r['mean_tok_s']:.0f} | "
              f"{r['kv_mb']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--section", choices=["kernels", "window"], default="kernels",
                    help="kernels: SDPA vs the reference path; window: sliding-window attention in a model")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--window-lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=4032)
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "T", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-forward", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--one-decode", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_forward:
        t, win = args.one_forward
        print(json.dumps(one_forward(t, win or None, args.repeats)))
        return
    if args.one_decode:
        mode, win, prompt, new = args.one_decode
        print(json.dumps(one_decode(mode, int(win), int(prompt), int(new))))
        return
    if args.section == "window":
        return window_section(args)
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
