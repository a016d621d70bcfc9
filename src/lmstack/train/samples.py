"""Sample previews during training: a thin call of the inference layer (``lmstack.infer.text``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer: Any, prompt: str, n_tokens: int, device: torch.device | None = None,
                seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> str:
    """Continue ``prompt`` with seeded top-k sampling through :func:`lmstack.infer.text.complete` (its
    empty-prompt, truncation, stop and decoding rules). ``device`` is unused (the model's is taken)."""
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import complete, fitting_budget

    budget = fitting_budget(model, n_tokens)
    config = GenerationConfig(max_new_tokens=budget, do_sample=True, temperature=temperature, top_k=top_k, seed=seed)
    return complete(model, tokenizer, prompt, config).text


def render_samples(samples: list[dict[str, str]]) -> str:
    """``samples.md``: each prompt and its continuation."""
    if not samples:
        return "_no samples (encoder objectives, or no prompts)_\n"
    return "\n".join(f"**{s['prompt']!r}** →\n\n```\n{s['prompt']}{s['text']}\n```\n" for s in samples)
