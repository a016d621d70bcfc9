"""Pruning benchmark: the speed-up of structured pruning and the perplexity cost of unstructured pruning.

    .venv/bin/python bench/prune.py                 # full: llama-style-125m (12 layers), 7 repeats, 400 stories
    .venv/bin/python bench/prune.py --small         # smallest settings: 4 layers of it, 3 repeats (~8 s here)

1. Speed (random weights, fp32, CPU, batch 1): the ``llama-style-125m`` preset (12 heads in 4 KV groups,
   SwiGLU d_ff 2048) before and after removing 25% of the heads (one whole KV group per layer) and 25% of
   the FFN neurons (magnitude scores): parameters, forward tokens/s (one 128-token sequence) and greedy
   decode tokens/s (16-token prompt, 32 new tokens, KV cache), and the ratios.
2. Quality (real weights, if ``shared/data/models/stories260K`` exists): held-out perplexity on TinyStories
   validation stories of the dense model, of Wanda vs magnitude at 50% unstructured (per layer) and 2:4,
   and of the 25% heads + 25% neurons structured model (magnitude vs activation scores, no recovery
   fine-tuning). Calibration: 32 sequences of 128 tokens from the TinyStories training text.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from generate import median_times  # noqa: E402  (bench/generate.py: the one interleaved timer)
from lmstack.compress.calib import text_batches  # noqa: E402
from lmstack.compress.prune import prune_unstructured, sparsity_report  # noqa: E402
from lmstack.compress.prune_structured import prune_structured  # noqa: E402
from lmstack.infer import GenerationConfig, generate  # noqa: E402
from lmstack.model import build_model, hf, preset  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


@torch.inference_mode()
def speed(n_layer: int | None, repeats: int) -> list[str]:
    cfg = preset("llama-style-125m", **({"n_layer": n_layer} if n_layer else {}))
    torch.manual_seed(0)
    dense = build_model(cfg).eval()
    pruned, _ = prune_structured(dense, heads=0.25, neurons=0.25)
    pruned.eval()
    seq = torch.randint(0, cfg.vocab_size, (1, 128))
    prompt = seq[:, :16]
    gen = GenerationConfig(max_new_tokens=32)
    fwd = median_times([lambda: dense(seq), lambda: pruned(seq)], repeats)
    dec = median_times([lambda: generate(dense, prompt, gen), lambda: generate(pruned, prompt, gen)], repeats)
    pc = pruned.config
    rows = [f"speed: llama-style-125m{f' (n_layer={n_layer})' if n_layer else ''}, fp32, batch 1, "
            f"{torch.get_num_threads()} threads; pruned: heads {cfg.n_head}->{pc.n_head} "
            f"(kv {cfg.n_kv_head}->{pc.n_kv_head}), d_ff {cfg.d_ff}->{pc.d_ff}",
            f"{'model':<10} {'params':>12} {'fwd tok/s':>10} {'decode tok/s':>13}"]
    for name, m, f, d in (("dense", dense, fwd[0], dec[0]), ("pruned", pruned, fwd[1], dec[1])):
        rows.append(f"{name:<10} {m.num_parameters():>12,} {128 / f:>10.0f} {32 / d:>13.1f}")
    rows.append(f"{'ratio':<10} {pruned.num_parameters() / dense.num_parameters():>12.3f} "
                f"{fwd[0] / fwd[1]:>9.2f}x {dec[0] / dec[1]:>12.2f}x")
    return rows


def perplexity(model, tok, texts: list[str]) -> float:
    from lmstack.eval.lm import text_nll

    res = text_nll(model, tok, texts, max_length=256, batch_size=16)
    return math.exp(sum(r.nll for r in res) / sum(r.n_tokens for r in res))


@torch.inference_mode()
def quality(n_texts: int, n_calib: int) -> list[str]:
    from lmstack.tokenizer import load_tokenizer

    src = DATA / "models" / "stories260K"
    text_dir = DATA / "text" / "tinystories"
    if not src.is_dir() or not text_dir.is_dir():
        return [f"quality: skipped ({src} or {text_dir} absent)"]
    tok = load_tokenizer(src)
    dense = hf.load(src).eval()
    stories = [s.strip() for s in (text_dir / "tinystories_valid_sample.txt").read_text().split("\n\n") if s.strip()]
    texts = stories[:n_texts]
    calib = text_batches(tok, [text_dir / "tinystories_train_first2MiB.txt"], seq_len=128, n_seqs=n_calib)
    base = perplexity(dense, tok, texts)
    rows = [f"quality: stories260K ({dense.num_parameters():,} params), perplexity on {len(texts)} TinyStories "
            f"validation stories; calibration {len(calib)} x 128 tokens",
            f"{'model':<40} {'sparsity':>9} {'params':>9} {'ppl':>9} {'vs dense':>9}",
            f"{'dense':<40} {0:>9.1%} {dense.num_parameters():>9,} {base:>9.3f} {1:>8.3f}x"]
    for label, kwargs in (("magnitude 50% (per layer)", dict(method="magnitude")),
                          ("wanda 50% (per output row)", dict(method="wanda", batches=calib)),
                          ("magnitude 2:4", dict(method="magnitude", pattern="2:4")),
                          ("wanda 2:4", dict(method="wanda", batches=calib, pattern="2:4"))):
        m = copy.deepcopy(dense)
        prune_unstructured(m, 0.5, **kwargs)
        p = perplexity(m, tok, texts)
        rows.append(f"{label:<40} {sparsity_report(m)['total']:>9.1%} {m.num_parameters():>9,} {p:>9.3f} "
                    f"{p / base:>8.3f}x")
    for score in ("magnitude", "activation"):
        m, _ = prune_structured(dense, heads=0.25, neurons=0.25, score=score, batches=calib)
        p = perplexity(m.eval(), tok, texts)
        rows.append(f"{'structured 25% heads+neurons, ' + score:<40} {'-':>9} {m.num_parameters():>9,} {p:>9.3f} "
                    f"{p / base:>8.3f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="4 layers, 3 repeats, 100 stories")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = speed(4 if args.small else None, 3 if args.small else 7)
    rows += [""] + quality(100 if args.small else 400, 16 if args.small else 32)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
