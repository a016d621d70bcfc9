"""Attention: SDPA (flash / memory-efficient kernels) vs the explicit reference path softmax(QK^T/sqrt(d))V.

Causal self-attention, B=1, H=8, head_dim=64, fp32 on CPU (bf16 on CUDA), forward+backward, at
T = 512..4096. Each (impl, T) runs in a fresh subprocess so that its peak memory is its own: peak RSS
growth on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Prints median times of several repeats
and the ratio reference/SDPA (> 1: SDPA is faster / smaller).

    .venv/bin/python bench/attention.py                  # CPU (and CUDA too when available)
    .venv/bin/python bench/attention.py --lengths 512 1024 --repeats 3

``--section window``: sliding-window attention (``ModelConfig.sliding_window``) in a small decoder (4 layers,
d_model 256, 8 heads, 2 KV heads, RoPE, fp32, CPU, one thread; times are CPU time, ``time.process_time``,
robust to other jobs on a shared machine), each cell in a fresh subprocess:

- full forward over T = 4096 and 8192 tokens: no window (SDPA's causal kernel), window 512 in query blocks
  of max(W, 128) (the model's path for long inputs), and window 512 through one dense (T, T) mask (the
  padded-batch path; SDPA computes the masked scores too): median time of interleaved rounds, and of one
  layer's attention alone, peak RSS growth (a fresh process per cell) and the bytes of the mask built once;
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


# The window section runs one thread and counts CPU time (time.process_time: this process's user + sys), not
# wall-clock time: on a shared machine other jobs stretch wall-clock time at random, CPU time much less.
THREADS = 1
CLOCK = time.process_time
WINDOW_MODEL = dict(vocab_size=4096, d_model=256, n_layer=4, n_head=8, n_kv_head=2, max_seq_len=8192)


def _window_model(window: int | None):
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", **WINDOW_MODEL, sliding_window=window)).eval()


FORWARD_MODES = ("none", "blocked", "dense")   # no window (causal kernel); window in query blocks; one dense mask


def _set_mode(mode: str) -> None:
    from lmstack.model import layers

    layers.WINDOW_BLOCK = 10 ** 9 if mode == "dense" else 128     # "dense": never block, one (T, T) mask


def one_forward_memory(t: int, window: int, mode: str) -> dict:
    """Peak RSS growth of one forward (a fresh process per cell) and the bytes of the mask it builds once."""
    torch.set_num_threads(THREADS)
    _set_mode(mode)
    model = _window_model(None if mode == "none" else window)
    ids = torch.randint(0, WINDOW_MODEL["vocab_size"], (1, t), generator=torch.Generator().manual_seed(0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(ids)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    inp, _ = model.attn_inputs(t, None, None, None, ids.device)
    mask = inp.window_mask.numel() * inp.window_mask.element_size() if inp.window_mask is not None else 0
    return {"peak_mb": peak / 2**20, "mask_mb": mask / 2**20}


def one_forward_times(t: int, window: int, repeats: int) -> dict:
    """Median forward time of the three modes, and of one layer's attention alone, interleaved in one
    process (round-robin repeats), so that other jobs on the machine slow every mode alike."""
    from lmstack.model.layers import attention, build_mask, window_attention_blocks

    torch.set_num_threads(THREADS)
    models = {"none": _window_model(None), "blocked": _window_model(window), "dense": _window_model(window)}
    ids = torch.randint(0, WINDOW_MODEL["vocab_size"], (1, t), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    hd = WINDOW_MODEL["d_model"] // WINDOW_MODEL["n_head"]
    q = torch.randn(1, WINDOW_MODEL["n_head"], t, hd, generator=gen)
    k = torch.randn(1, WINDOW_MODEL["n_kv_head"], t, hd, generator=gen)
    block = max(window, 128)
    block_mask = build_mask(None, block, block + window - 1, True, q.device, window)
    dense_mask = build_mask(None, t, t, True, q.device, window)
    attn = {"none": lambda: attention(q, k, k, is_causal=True),
            "blocked": lambda: window_attention_blocks(q, k, k, block_mask, window, block),
            "dense": lambda: attention(q, k, k, dense_mask)}
    fwd: dict[str, list[float]] = {m: [] for m in FORWARD_MODES}
    att: dict[str, list[float]] = {m: [] for m in FORWARD_MODES}
    with torch.no_grad():
        for r in range(repeats + 1):                               # round 0 is the warm-up
            for mode in FORWARD_MODES:
                _set_mode(mode)
                t0 = CLOCK()
                models[mode](ids)
                t1 = CLOCK()
                attn[mode]()
                t2 = CLOCK()
                if r:
                    fwd[mode].append(t1 - t0)
                    att[mode].append(t2 - t1)
    return {m: {"fwd_ms": 1e3 * statistics.median(fwd[m]), "attn_ms": 1e3 * statistics.median(att[m])}
            for m in FORWARD_MODES}


def one_decode(mode: str, window: int, prompt: int, new: int) -> dict:
    from lmstack.infer import GenerationConfig, generate_result, stream

    torch.set_num_threads(THREADS)
    model = _window_model(None if mode in ("full", "sinks") else window)
    ids = torch.randint(0, WINDOW_MODEL["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=new, eos_token_id=None)
    if mode == "rolling":
        cfg = cfg.replace(sliding_window=window)
    elif mode == "sinks":
        cfg = cfg.replace(sliding_window=window, attention_sinks=4)
    generate_result(model, ids, cfg.replace(max_new_tokens=16))         # warm-up (first-call allocations)
    steps, t0 = [], CLOCK()
    for _ in stream(model, ids, cfg):                                   # one yield per decode step
        now = CLOCK()
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
    print(f"torch {torch.__version__}; decoder {WINDOW_MODEL}, fp32, CPU, {THREADS} thread(s), CPU-time "
          f"(process_time) figures; window {w}")
    print(f"\nfull forward (no grad), median of {args.repeats} interleaved rounds; attention alone = one layer's "
          f"SDPA on (1, 8, T, 32) queries, (1, 2, T, 32) keys:\n")
    print("| T | attention | forward CPU ms | attention alone CPU ms | peak RSS growth MB | window mask MB (built once) |")
    print("|" + " --- |" * 6)
    names = {"none": "full (causal kernel)", "blocked": f"window {w}, query blocks", "dense": f"window {w}, dense mask"}
    for t in args.window_lengths:
        times = _sub("--one-forward-times", str(t), str(w), "--repeats", str(args.repeats))
        for mode in FORWARD_MODES:
            mem = _sub("--one-forward-memory", str(t), str(w), mode)
            print(f"| {t} | {names[mode]} | {times[mode]['fwd_ms']:.0f} | {times[mode]['attn_ms']:.1f} | "
                  f"{mem['peak_mb']:.0f} | {mem['mask_mb']:.2f} |", flush=True)
    if args.skip_decode:
        return
    print(f"\ncached greedy decode, prompt {args.prompt}, {args.new} new tokens (positions up to "
          f"{args.prompt + args.new}):\n")
    print("| attention | cache | tok per CPU-s (median step, 2nd half) | tok per CPU-s (mean, all steps) | KV cache MB |")
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
    ap.add_argument("--one-forward-times", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--one-forward-memory", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--skip-decode", action="store_true", help="window section: the forward table only")
    ap.add_argument("--one-decode", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_forward_times:
        t, win = args.one_forward_times
        print(json.dumps(one_forward_times(t, win, args.repeats)))
        return
    if args.one_forward_memory:
        t, win, mode = args.one_forward_memory
        print(json.dumps(one_forward_memory(int(t), int(win), mode)))
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
