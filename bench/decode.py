"""Decode-speed benchmark: per-token overhead on a tiny real model, and batch-1 decoding of a ~125M model
against the memory-bandwidth bound, eager vs ``GenerationConfig(compile=True)`` vs int8 / int4 weights.

    .venv/bin/python bench/decode.py               # ~4-8 minutes on 2 CPU cores (most of it compiling)
    .venv/bin/python bench/decode.py --quick       # fewer tokens and repeats, no int4 compile

1. ``stories260K`` (the real Llama-architecture checkpoint in ../shared/data/models), 1 thread, batch 1,
   greedy, prompt = BOS, 251 new tokens: the task llama2.c's ``run.c`` does at ~3,500 tokens/s on this
   kind of machine (the figure quoted in issue 12, not measured here). Rows: eager, compiled.
2. ``llama-style-125m`` random weights, batch 1, greedy, 2 threads: fp32 eager / compiled, int8 and
   int4-g128 (``lmstack.compress.QuantConfig``) eager / compiled. The bound: bytes read per token (every
   weight but the token-embedding table, of which one row is read, plus the KV cache at the mean
   context) divided by the copy bandwidth measured in the same run at the same thread count.

Tokens/s are decode-loop figures (``stats["decode_s"]``, the prefill excluded), median of the repeats,
variants interleaved so that load from other jobs hits all alike; compile time is the first call.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress import measured_bandwidth  # noqa: E402  (bench/compress.py: the one bandwidth probe)

import lmstack.infer.runner as runner  # noqa: E402
from lmstack.infer import GenerationConfig, generate_result  # noqa: E402

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "stories260K"


def decode_rates(cases: list[tuple], repeats: int) -> list[dict]:
    """cases: (name, model, prompt, config). First call (compile time) then ``repeats`` interleaved runs."""
    out = []
    for name, model, prompt, cfg in cases:
        t0 = time.perf_counter()
        first = generate_result(model, prompt, cfg)
        out.append({"name": name, "first_s": time.perf_counter() - t0, "rates": [], "ids": first.sequences,
                    "fallback": runner._failed.get(model) if cfg.compile else None})
    for _ in range(repeats):
        for row, (name, model, prompt, cfg) in zip(out, cases):
            res = generate_result(model, prompt, cfg)
            row["rates"].append(res.stats["new_tokens"] / res.stats["decode_s"])
            row["total_rate"] = res.stats["new_tokens"] / res.stats["total_s"]
    for row in out:
        row["tok_s"] = statistics.median(row["rates"])
    return out


def stories(repeats: int, new: int) -> list[str]:
    from lmstack.model import hf

    torch.set_num_threads(1)
    model = hf.load(STORIES).eval()
    cfg = GenerationConfig(max_new_tokens=new, eos_token_id=[])      # all `new` steps, as run.c does
    rows = decode_rates([("eager", model, [[1]], cfg), ("compiled", model, [[1]], cfg.replace(compile=True))],
                        repeats)
    same = torch.equal(rows[0]["ids"], rows[1]["ids"])
    lines = [f"stories260K ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters, fp32), 1 thread, "
             f"batch 1, greedy, prompt = BOS, {new} new tokens; median of {repeats}.", "",
             "| decode step | tokens/s | ms per token | first call (s) | vs llama2.c run.c (~3,500 tok/s, quoted) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        note = f" (compile failed, eager static step: {r['fallback']})" if r["fallback"] else ""
        lines.append(f"| {r['name']}{note} | {r['tok_s']:.0f} | {1e3 / r['tok_s']:.3f} | {r['first_s']:.1f} | "
                     f"{r['tok_s'] / 3500:.2f}x |")
    lines.append(f"\nSame ids eager vs compiled: {same}.")
    return lines


def bytes_read_per_token(model, context: float) -> int:
    """Weights read by one decode step (the embedding table: one row) + the KV cache at ``context`` slots."""
    from lmstack.compress import model_bytes

    emb = model.embed.tok.weight
    tied = model.lm_head.weight is emb
    table = 0 if tied else emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    kv = model.config.kv_cache_bytes_per_token(next(model.parameters()).dtype) * context
    return int(model_bytes(model) - table + kv)


def llama125m(repeats: int, new: int, threads: int, compile_int4: bool, preset_name: str) -> list[str]:
    from lmstack.compress import QuantConfig, quantize_model
    from lmstack.model import build_model, preset

    torch.set_num_threads(threads)
    bw = measured_bandwidth()
    torch.manual_seed(0)
    base = build_model(preset(preset_name)).eval()
    variants = {"fp32": base}
    for name, qc in (("int8", QuantConfig("int8")), ("int4-g128", QuantConfig("int4", 128))):
        m = copy.deepcopy(base)
        quantize_model(m, qc)
        variants[name] = m
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
    cases = []
    for name, m in variants.items():
        cases.append((f"{name} eager", m, prompt, cfg))
        if name != "int4-g128" or compile_int4:
            cases.append((f"{name} compiled", m, prompt, cfg.replace(compile=True)))
    rows = decode_rates(cases, repeats)
    context = 16 + new / 2
    n_params = sum(p.numel() for p in base.parameters())
    fp32 = rows[0]["tok_s"]
    lines = [f"{preset_name} ({n_params / 1e6:.0f}M parameters, random weights), {threads} threads, batch 1, "
             f"greedy, 16-token prompt, {new} new tokens; median of {repeats}. Measured copy bandwidth "
             f"{bw / 1e9:.1f} GB/s (read + write, {threads} threads).", "",
             "| model | tokens/s | vs fp32 eager | MB read per token | % of bandwidth bound | first call (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r, (name, m, _, _) in zip(rows, cases):
        read = bytes_read_per_token(m, context)
        note = f" (did not compile, eager static step: {r['fallback'][:60]})" if r["fallback"] else ""
        lines.append(f"| {name}{note} | {r['tok_s']:.1f} | {r['tok_s'] / fp32:.2f}x | {read / 1e6:.0f} | "
                     f"{100 * r['tok_s'] * read / bw:.0f}% | {r['first_s']:.1f} |")
    same = all(torch.equal(rows[0]["ids"], r["ids"]) for r, c in zip(rows, cases) if c[0].startswith("fp32"))
    lines.append(f"\nfp32 eager and compiled give the same ids: {same}.")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=251)
    p.add_argument("--large-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="llama-style-125m", help="the model of the bandwidth-bound section")
    p.add_argument("--quick", action="store_true", help="3 repeats, 32 tokens on the 125M model, no int4 compile")
    p.add_argument("--skip", choices=["stories", "125m"], action="append", default=[])
    args = p.parse_args()
    if args.quick:
        args.repeats, args.large_new_tokens = 3, 32
    load = os.getloadavg()[0]
    print(f"# lmstack decode-speed benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, load {load:.2f}\n",
          flush=True)
    out: list[str] = []
    if "stories" not in args.skip and STORIES.is_dir():
        out += ["## per-token overhead: stories260K", ""] + stories(args.repeats, args.new_tokens) + [""]
        print("\n".join(out), flush=True)
    if "125m" not in args.skip:
        out += [f"## batch-1 decode vs the memory-bandwidth bound: {args.preset}", ""]
        out += llama125m(args.repeats, args.large_new_tokens, args.threads, not args.quick, args.preset)
    print("\n" + "\n".join(out))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
