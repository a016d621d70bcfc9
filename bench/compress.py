"""Quantization: what each format costs in quality and buys in size and speed, with torchao in the same run.

Part 1, quality, on the real pre-trained stories260K (../shared/data/models/stories260K) over held-out
TinyStories text: file size, perplexity and its change, mean KL divergence of the next-token distributions
against the fp32 model (llama.cpp's --kl-divergence method), top-1 agreement, batch-1 decode tokens/s.
Rows: fp32, bf16 (where the CPU runs it natively), int8 (weight-only and W8A8), int4-g128 / int4-g32 (symmetric and asymmetric),
NF4, GPTQ-int4, AWQ-int4 (both calibrated on TinyStories training text), torchao int8 / int4 weight-only.

Part 2, speed, on the llama-style-125m preset (random weights are fine for speed): batch-1 and batch-8
decode tokens/s for fp32 eager, int8 and int4, and the fraction of the memory-bandwidth bound (weight bytes
read per token against the measured copy bandwidth of this machine).

    python bench/compress.py                  # both parts
    python bench/compress.py --skip speed     # quality only (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def measured_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), median of ``repeats``."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * a.numel() * 4 / times[len(times) // 2]


def torchao_variants(ref):
    """torchao's int8 and int4 weight-only on the same model (None where this torchao/CPU lacks one)."""
    out = {}
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao not installed: pip install torchao for the peer rows", file=sys.stderr)
        return out
    m = copy.deepcopy(ref)
    quantize_(m, Int8WeightOnlyConfig(), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear)
              and not name.endswith("lm_head"))
    out["torchao-int8"] = m
    try:
        m4 = copy.deepcopy(ref)
        quantize_(m4, Int4WeightOnlyConfig(group_size=32),
                  filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
                  and mod.in_features % 32 == 0)
        out["torchao-int4-g32"] = m4
    except Exception as e:  # noqa: BLE001 - report and continue: the peer's CPU int4 path varies by version
        print(f"torchao int4 unavailable here: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    return out


def quality(args) -> list[dict]:
    from lmstack.compress import QuantConfig, model_bytes, quantize_model
    from lmstack.compress.awq import awq_model
    from lmstack.compress.gptq import gptq_model
    from lmstack.eval.compression import compare, render, token_chunks
    from lmstack.model import hf
    from lmstack.runtime import resolve_dtype
    from lmstack.tokenizer import load_tokenizer

    folder = SHARED / "models" / "stories260K"
    if not folder.is_dir():
        print(f"skipping quality: {folder} not found (see ../shared/data/README.md)")
        return []
    ref = hf.load(folder).eval()
    tok = load_tokenizer(folder)
    text = (SHARED / "text" / "tinystories" / "tinystories_valid_sample.txt").read_text()[: args.eval_chars]
    chunks = token_chunks(tok.encode(text), args.seq_len, args.chunks)
    train = (SHARED / "text" / "tinystories" / "tinystories_train_first2MiB.txt").read_text()[:200_000]
    calib = list(token_chunks(tok.encode(train), args.seq_len, 32).split(4))
    row = dict(on_mismatch="row")  # stories260K's FFN width (172) is divisible by no group size
    variants = {
        "int8": lambda m: quantize_model(m, QuantConfig("int8")),
        "int8-w8a8": lambda m: quantize_model(m, QuantConfig("int8", activations="int8")),
        "int4-g128": lambda m: quantize_model(m, QuantConfig("int4", 128, **row)),
        "int4-g32": lambda m: quantize_model(m, QuantConfig("int4", 32, **row)),
        "int4-g32-asym": lambda m: quantize_model(m, QuantConfig("int4", 32, symmetric=False, **row)),
        "nf4-g32": lambda m: quantize_model(m, QuantConfig("nf4", 32, **row)),
        "gptq-int4-g32": lambda m: gptq_model(m, calib, QuantConfig("int4", 32, **row)),
        "awq-int4-g32": lambda m: awq_model(m, calib, QuantConfig("int4", 32, **row)),
    }
    models, sizes = {}, {"reference": model_bytes(ref)}
    if resolve_dtype("auto", torch.device("cpu")).dtype == torch.bfloat16:
        models["bf16"] = copy.deepcopy(ref).to(torch.bfloat16)
    for name, make in variants.items():
        m = copy.deepcopy(ref)
        make(m)
        models[name] = m
    models.update(torchao_variants(ref))
    for name, m in models.items():
        sizes[name] = model_bytes(m) if not name.startswith("torchao") else _torchao_bytes(m)
    wrapped = {k: (_Bf16In(m) if k == "bf16" else m) for k, m in models.items()}
    rows = compare(ref, wrapped, chunks, sizes, new_tokens=args.new_tokens)
    print(f"\n## Quality on stories260K ({chunks.shape[0]} chunks x {args.seq_len} tokens, threads "
          f"{torch.get_num_threads()})\n")
    print(render(rows))
    return [r.to_dict() for r in rows]


class _Bf16In(torch.nn.Module):
    """Feeds ids to a bf16 model and hands back fp32 logits (so the KLD maths stays in fp32)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids, **kw):
        out = self.model(ids, **kw)
        return out.float() if isinstance(out, torch.Tensor) else out


def _torchao_bytes(model) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = [getattr(t, n) for n in ("qdata", "scale", "zero_point", "packed_weight", "int_data")
                 if isinstance(getattr(t, n, None), torch.Tensor)]
        total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total


def speed(args) -> list[dict]:
    from lmstack.compress import QuantConfig, model_bytes, quantize_model
    from lmstack.infer import GenerationConfig, generate
    from lmstack.model import build_model, preset

    bw = measured_bandwidth()
    torch.manual_seed(0)
    base = build_model(preset(args.speed_preset)).eval()
    variants = {"fp32": base}
    for name, cfg in (("int8", QuantConfig("int8")), ("int8-w8a8", QuantConfig("int8", activations="int8")),
                      ("int4-g128", QuantConfig("int4", 128))):
        m = copy.deepcopy(base)
        quantize_model(m, cfg)
        variants[name] = m
    rows = []
    for name, m in variants.items():
        weight_bytes = model_bytes(m)
        for batch in (1, 8):
            prompt = torch.randint(0, m.config.vocab_size, (batch, 16))
            cfg = GenerationConfig(max_new_tokens=args.speed_tokens, min_new_tokens=args.speed_tokens)
            generate(m, prompt, GenerationConfig(max_new_tokens=2))
            t0 = time.perf_counter()
            generate(m, prompt, cfg)
            sec = time.perf_counter() - t0
            steps_per_s = args.speed_tokens / sec
            rows.append({"model": name, "batch": batch, "tokens_per_s": round(batch * steps_per_s, 1),
                         "weight_MB": round(weight_bytes / 1e6, 1),
                         "bound_fraction": round(steps_per_s * weight_bytes / bw, 3)})
    fp32 = {r["batch"]: r["tokens_per_s"] for r in rows if r["model"] == "fp32"}
    print(f"\n## Decode speed, {args.speed_preset} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params), "
          f"{args.speed_tokens} new tokens, measured copy bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| model | batch | tokens/s | vs fp32 | weights MB | % of bandwidth bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / fp32[r['batch']]:.2f}x | "
              f"{r['weight_MB']} | {100 * r['bound_fraction']:.1f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", choices=["quality", "speed"], action="append", default=[])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--eval-chars", type=int, default=200_000)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--speed-preset", default="llama-style-125m")
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    out = {}
    if "quality" not in args.skip:
        out["quality"] = quality(args)
    if "speed" not in args.skip:
        out["speed"] = speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
