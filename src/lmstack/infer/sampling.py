"""Logits processors: small pure functions, wrapped as callables ``(ids, logits) -> logits`` that compose.

``ids`` (B, T) is every token so far (prompt + generated), ``logits`` (B, V) the scores of the next
token, fp32. A processor returns new scores; filtered tokens get ``-inf``. :func:`build_processors`
turns a :class:`GenerationConfig` into the chain, in Hugging Face's order (penalties, min length,
then, when sampling, temperature -> top-k -> top-p -> min-p), so the same config gives the same
filtered distribution as ``transformers.generate``. Later layers add constraints (e.g. a JSON
grammar) by appending their own callable to the list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.infer.config import GenerationConfig

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------- pure functions


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th are kept too)."""
    k = min(max(k, min_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p.

    Sorted ascending, a token is dropped when the mass of it and everything below it is <= 1 - p.
    """
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                     # (B, V) ascending mass
    drop_sorted = cum <= 1 - p
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)                     # back to vocab order
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    drop.scatter_(-1, keep, False)
    return logits.masked_fill(drop, NEG_INF)


def seen_mask(ids: torch.Tensor, vocab: int, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) True where the token occurs in ``ids`` (B, T); ``ignore`` (B, T) True marks positions to skip."""
    if ignore is not None:
        ids = ids.masked_fill(ignore, vocab)                               # an extra column, cut below
    mask = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab]


def token_counts(ids: torch.Tensor, vocab: int, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) float counts of each token in ``ids`` (B, T), skipping ``ignore`` positions."""
    if ignore is not None:
        ids = ids.masked_fill(ignore, vocab)
    counts = torch.zeros(ids.shape[0], vocab + 1, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): divide positive scores of seen tokens by ``penalty``, multiply negative ones."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


# ---------------------------------------------------------------------------------------------------- processors


@dataclass
class Temperature:
    temperature: float

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return apply_temperature(logits, self.temperature)


@dataclass
class TopK:
    k: int
    min_keep: int = 1

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return top_k_filter(logits, self.k, self.min_keep)


@dataclass
class TopP:
    p: float
    min_keep: int = 1

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return top_p_filter(logits, self.p, self.min_keep)


@dataclass
class MinP:
    p: float
    min_keep: int = 1

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return min_p_filter(logits, self.p, self.min_keep)


@dataclass
class RepetitionPenalty:
    """Penalises every token seen in the row; ``pad_len`` (B,) left-padding positions are ignored."""

    penalty: float
    pad_len: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ignore = None
        if self.pad_len is not None:
            ignore = torch.arange(ids.shape[1], device=ids.device)[None] < self.pad_len[:, None]
        return repetition_penalty(logits, seen_mask(ids, logits.shape[-1], ignore), self.penalty)


@dataclass
class FrequencyPresencePenalty:
    """OpenAI-style: ``logit -= frequency * count + presence * (count > 0)`` over generated tokens only
    (positions >= ``prompt_len``)."""

    frequency: float
    presence: float
    prompt_len: int

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counts = token_counts(ids[:, self.prompt_len:], logits.shape[-1])
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


@dataclass
class MinNewTokens:
    """Forbid the stop ids until ``min_new`` tokens have been generated after ``prompt_len``."""

    stop_ids: Sequence[int]
    min_new: int
    prompt_len: int

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] - self.prompt_len >= self.min_new:
            return logits
        logits = logits.clone()
        logits[:, list(self.stop_ids)] = NEG_INF
        return logits


@dataclass
class SuppressTokens:
    """Never generate these ids (HF's ``suppress_tokens``): e.g. a chat model's role markers mid-reply."""

    token_ids: Sequence[int]

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, [i for i in self.token_ids if i < logits.shape[-1]]] = NEG_INF
        return logits


def apply_processors(processors: Sequence[Processor], ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    for proc in processors:
        logits = proc(ids, logits)
    return logits


def build_processors(config: GenerationConfig, prompt_len: int, pad_len: torch.Tensor | None = None,
                     stop_ids: Sequence[int] = (), sampling: bool | None = None,
                     min_keep: int = 1, tokenizer: Any = None, vocab_size: int | None = None) -> list[Processor]:
    """The processor chain for ``config`` (HF order). ``sampling`` adds the warpers (default: ``do_sample``);
    ``min_keep`` is how many tokens every filter keeps (beam sampling keeps n_eos + 1, as HF).

    A ``json_schema`` / ``regex`` / ``grammar`` constraint (:mod:`lmstack.infer.constrain`, compiled here,
    so a bad schema fails now) masks after the penalties and before the warpers; it needs ``tokenizer``
    and the model's ``vocab_size``."""
    procs: list[Processor] = []
    if config.suppress_tokens:
        procs.append(SuppressTokens(list(config.suppress_tokens)))
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(config.repetition_penalty, pad_len))
    if config.frequency_penalty or config.presence_penalty:
        procs.append(FrequencyPresencePenalty(config.frequency_penalty, config.presence_penalty, prompt_len))
    if config.min_new_tokens > 0 and stop_ids:
        procs.append(MinNewTokens(list(stop_ids), config.min_new_tokens, prompt_len))
    if config.json_schema is not None or config.regex is not None or config.grammar is not None:
        from lmstack.infer.constrain import constraint_processor

        procs.append(constraint_processor(config, tokenizer, prompt_len, vocab_size, stop_ids))
    if config.do_sample if sampling is None else sampling:
        if config.temperature != 1.0:
            procs.append(Temperature(config.temperature))
        if config.top_k:
            procs.append(TopK(config.top_k, min_keep))
        if config.top_p < 1.0:
            procs.append(TopP(config.top_p, min_keep))
        if config.min_p > 0.0:
            procs.append(MinP(config.min_p, min_keep))
    return procs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from probs (B, V) -> (B,)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
