"""Markdown for reports (the speedrun's): decoding strategies side by side, and the speculative speedup.

    from lmstack.infer.report import sample_table, speculative_summary
    md = sample_table(model, tokenizer, ["Once upon a time"]) + speculative_summary(model, tokenizer, prompts)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lmstack.infer.config import GenerationConfig
from lmstack.infer.engine import generate_result
from lmstack.infer.text import _with_defaults, encode_prompt, generate_text

STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": dict(do_sample=False),
    "top-k (k=40, T=0.8)": dict(do_sample=True, top_k=40, temperature=0.8),
    "top-p (p=0.9, T=0.8)": dict(do_sample=True, top_p=0.9, temperature=0.8),
    "beam (4 beams)": dict(num_beams=4),
}


def _cell(text: str, limit: int = 300) -> str:
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ⏎ ")
    return (text[:limit] + "…") if len(text) > limit else text


def sample_table(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48,
                 seed: int = 0, strategies: dict[str, dict[str, Any]] | None = None) -> str:
    """One markdown table per prompt: each decoding strategy's completion, side by side."""
    strategies = strategies or STRATEGIES
    out = []
    for prompt in prompts:
        rows = ["| strategy | completion |", "| --- | --- |"]
        for name, fields in strategies.items():
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, **fields)
            rows.append(f"| {name} | {_cell(generate_text(model, tokenizer, prompt, cfg))} |")
        out.append(f"**Prompt:** `{_cell(prompt, 120)}`\n\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def speculative_speedup(model: nn.Module, tokenizer: Any, prompts: Sequence[str], draft_model: nn.Module | None = None,
                        max_new_tokens: int = 64, num_assistant_tokens: int = 4, repeats: int = 3) -> dict[str, float]:
    """Greedy decoding of each prompt (batch 1) by the model alone and speculatively (with ``draft_model``,
    else prompt lookup); median wall-clock over ``repeats``. The outputs are identical by construction
    (greedy) but compared anyway: ``identical`` says whether every prompt's new tokens matched; returns
    seconds, speedup, acceptance and tokens per target forward."""
    base = _with_defaults(tokenizer, GenerationConfig(max_new_tokens=max_new_tokens))
    spec = base.replace(num_assistant_tokens=num_assistant_tokens) if draft_model is not None else \
        base.replace(prompt_lookup_num_tokens=num_assistant_tokens)
    ids = [encode_prompt(tokenizer, p) for p in prompts]

    def run(cfg: GenerationConfig, draft: nn.Module | None) -> tuple[float, list[dict[str, Any]], list[list[int]]]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = [generate_result(model, [p], cfg, draft_model=draft) for p in ids]
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], [r.stats for r in results], [r.new_tokens(0) for r in results]

    plain_s, _, plain_out = run(base, None)
    spec_s, stats, spec_out = run(spec, draft_model)
    proposed = sum(s.get("proposed", 0) for s in stats)
    accepted = sum(s.get("accepted", 0) for s in stats)
    per_fwd = sum(s["new_tokens"] for s in stats) / max(sum(s.get("target_forwards", 1) for s in stats), 1)
    return {"plain_s": plain_s, "speculative_s": spec_s, "speedup": plain_s / spec_s,
            "acceptance": accepted / proposed if proposed else 0.0, "tokens_per_target_forward": per_fwd,
            "method": "draft model" if draft_model is not None else "prompt lookup",
            "identical": plain_out == spec_out}


def speculative_summary(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                        draft_model: nn.Module | None = None, **kwargs: Any) -> str:
    """:func:`speculative_speedup` as a short markdown paragraph."""
    with torch.inference_mode():
        r = speculative_speedup(model, tokenizer, prompts, draft_model, **kwargs)
    return (f"Speculative decoding ({r['method']}, greedy, batch 1): {r['speedup']:.2f}x wall-clock vs the model "
            f"alone ({r['speculative_s']:.2f} s vs {r['plain_s']:.2f} s for {len(prompts)} prompts), acceptance "
            f"{r['acceptance']:.0%}, {r['tokens_per_target_forward']:.2f} tokens per target forward.\n")
