"""Sample previews during training: a thin call of the inference layer (``lmstack.infer.text``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer: Any, prompt: str, n_tokens: int, device: torch.device | None = None,
                seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> str:
    """Continue ``prompt`` with seeded top-k sampling; the prompt keeps its last tokens that leave room for
    ``n_tokens`` in the model's context. ``device`` is unused (the engine runs where the model is)."""
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import encode_prompt, generate_text

    max_len = model.config.max_seq_len
    ids = encode_prompt(tokenizer, prompt)[-max(1, max_len - n_tokens):]
    config = GenerationConfig(max_new_tokens=min(n_tokens, max_len - len(ids)), do_sample=True,
                              temperature=temperature, top_k=top_k, seed=seed,
                              suppress_tokens=list(range(tokenizer.vocab_size, model.config.vocab_size)))  # padded rows
    return generate_text(model, tokenizer, [ids], config)[0]


def render_samples(samples: list[dict[str, str]]) -> str:
    """``samples.md``: each prompt and its continuation."""
    if not samples:
        return "_no samples (encoder objectives, or no prompts)_\n"
    return "\n".join(f"**{s['prompt']!r}** →\n\n```\n{s['prompt']}{s['text']}\n```\n" for s in samples)
