"""What compression cost (lmstack.compress), measured: size, perplexity, KL divergence against the reference, top-1

The quality figures follow llama.cpp's ``perplexity --kl-divergence`` method: both models read the same
token chunks; at every position the next-token distributions are compared,

    KLD = mean over positions of  sum_v P_ref(v) * (log P_ref(v) - log P_model(v))

(the reference's distribution first, so it measures how much of the reference's belief the compressed model
loses), top-1 agreement is the share of positions where both argmaxes agree, and perplexity is
``exp(mean next-token NLL)`` of each model on the same chunks. Speed is greedy decoding at batch 1 through
the one engine, timed once per model with no warm-up beyond one short untimed call (the first call pays
one-off costs such as the int4 kernel's weight repacking).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import DataError


@dataclass
class CompressionRow:
    name: str
    size_bytes: int
    ppl: float
    kld_mean: float
    top1_agree: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_chunks(ids: Sequence[int], seq_len: int, max_chunks: int) -> torch.Tensor:
    """Up to ``max_chunks`` consecutive, non-overlapping chunks (N, seq_len) of a token stream."""
    n = min(len(ids) // seq_len, max_chunks)
    if n == 0:
        raise DataError(f"the evaluation text has {len(ids)} tokens, fewer than one chunk of {seq_len}; "
                        f"give more text or a shorter --seq-len")
    return torch.tensor(list(ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def quality(ref: nn.Module, model: nn.Module, chunks: torch.Tensor, batch_size: int = 8
            ) -> tuple[float, float, float, float]:
    """(ppl of ``model``, ppl of ``ref``, mean KLD(ref || model), top-1 agreement) over ``chunks`` (N, T)."""
    nll = nll_ref = kld = agree = 0.0
    count = 0
    for i in range(0, chunks.shape[0], batch_size):
        x = chunks[i: i + batch_size]
        lp_ref = F.log_softmax(ref(x[:, :-1]).float(), dim=-1)              # (B, T-1, V)
        lp = F.log_softmax(model(x[:, :-1]).float(), dim=-1)
        y = x[:, 1:]
        nll -= float(lp.gather(-1, y[..., None]).sum())
        nll_ref -= float(lp_ref.gather(-1, y[..., None]).sum())
        kld += float((lp_ref.exp() * (lp_ref - lp)).sum())
        agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        count += y.numel()
    return math.exp(nll / count), math.exp(nll_ref / count), kld / count, agree / count


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64) -> float:
    """Greedy batch-1 tokens/s through :func:`lmstack.infer.generate` (one short untimed call first)."""
    from lmstack.infer import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    generate(model, prompt, GenerationConfig(max_new_tokens=2))
    t0 = time.perf_counter()
    generate(model, prompt, cfg)
    return new_tokens / (time.perf_counter() - t0)


def compare(ref: nn.Module, models: dict[str, nn.Module], chunks: torch.Tensor, sizes: dict[str, int],
            new_tokens: int = 64) -> list[CompressionRow]:
    """One row per model (the reference first, KLD 0) on the same chunks and the same decode prompt."""
    prompt = chunks[:1, :8]
    rows = []
    for name, model in {"reference": ref, **models}.items():
        model.eval()
        ppl, _, kld, agree = quality(ref, model, chunks)
        rows.append(CompressionRow(name, sizes[name], round(ppl, 4), round(kld, 6), round(agree, 4),
                                   round(decode_speed(model, prompt, new_tokens), 1)))
    return rows


def render(rows: list[CompressionRow]) -> str:
    """A Markdown table with the perplexity change and size ratio against the first (reference) row."""
    base = rows[0]
    out = ["| model | size (MB) | size vs ref | ppl | ppl change | KLD | top-1 agree | decode tok/s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r.name} | {r.size_bytes / 1e6:.2f} | {r.size_bytes / base.size_bytes:.2f}x | {r.ppl:.3f} | "
                   f"{100 * (r.ppl / base.ppl - 1):+.2f}% | {r.kld_mean:.5f} | {100 * r.top1_agree:.1f}% | "
                   f"{r.tokens_per_s:.0f} |")
    return "\n".join(out)
