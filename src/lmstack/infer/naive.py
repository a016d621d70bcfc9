"""The reference ``generate``: one prompt at a time, no KV cache, the whole sequence recomputed every step.

Slow and obviously right; the engine is tested against it (batched, cached, padded, speculative
decoding must give the same ids). It shares only the logits processors with the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmstack.infer.config import GenerationConfig
from lmstack.infer.sampling import apply_processors, build_processors


@torch.inference_mode()
def naive_generate(model: nn.Module, prompt: Sequence[int], config: GenerationConfig,
                   generator: torch.Generator | None = None) -> list[int]:
    """The new ids for one prompt (greedy or sampling), stopping at an EOS id or ``max_new_tokens``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)   # (1, T)
    eos = set(config.eos_token_id or [])
    procs = build_processors(config, ids.shape[1], None, sorted(eos))
    out: list[int] = []
    for _ in range(config.max_new_tokens):
        logits = model(ids)[:, -1].float()                                # (1, V): everything recomputed
        logits = apply_processors(procs, ids, logits)
        if config.do_sample:
            tok = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        else:
            tok = int(logits.argmax(-1))
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
        if tok in eos:
            break
    return out
