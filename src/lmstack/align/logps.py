"""Log-probabilities of given tokens under a model: what every alignment loss is built from.

The layout is the trainer's: ``x`` (B, T) the input ids and ``y`` (B, T) the ids to score, already shifted
(``y[:, t]`` is the token after ``x[:, t]``), ``-100`` where nothing is scored (prompt, padding). So a
chat example rendered for SFT is scored as it is trained on, and only the response tokens count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> log p(label) (B, T) in float32, 0 where ``labels == -100``.

    ``log_softmax`` then a gather: the same numbers as ``-cross_entropy(reduction="none")`` without
    materialising a second (B, T, V) tensor in the caller.
    """
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * mask


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of the response tokens' log-probs per row: (B,) float32.

    DPO, IPO, KTO and the reward-free methods compare these sums between a policy and its reference;
    SimPO-style length normalisation is ``average=True``.
    """
    logits = model(x, attention_mask=attention_mask) if attention_mask is not None else model(x)
    logp = token_logps(logits, y)
    total = logp.sum(-1)
    if not average:
        return total
    return total / (y != IGNORE).sum(-1).clamp(min=1)
