"""Mixing sources with weights: how many times each source's documents go into the training shards.

Two ways to read a source's ``weight``:

- ``by = "epochs"``: the weight is the number of passes over the source (2.0 repeats every document twice,
  0.5 keeps a seeded random half, measured in tokens);
- ``by = "tokens"``: weights are shares of a token budget ``total_tokens`` (0: the cleaned corpus's own
  size, so the mix only re-balances); a source's epochs are then its share of the budget over its tokens.

Whole passes take every document; the fractional pass takes documents in a seeded random order until
its token target is reached. The final order of all picked documents is shuffled with the same seed, so
repeated copies spread across shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmstack.errors import ConfigError


@dataclass
class MixConfig:
    by: Literal["epochs", "tokens"] = "epochs"
    total_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.total_tokens < 0:
            raise ConfigError("mix.total_tokens: must be >= 0")


@dataclass
class SourceMix:
    name: str
    docs: int
    tokens: int
    weight: float
    epochs: float
    mixed_docs: int = 0
    mixed_tokens: int = 0


@dataclass
class MixPlan:
    """Per-source rows for the report and ``order``: (source index, document index) pairs in write order."""
    rows: list[SourceMix]
    order: np.ndarray = field(repr=False)

    @property
    def total_tokens(self) -> int:
        return sum(r.mixed_tokens for r in self.rows)

    def table(self) -> str:
        """The mix as a Markdown table."""
        total = max(self.total_tokens, 1)
        out = ["| source | documents | tokens | weight | epochs | mixed documents | mixed tokens | share |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            out.append(f"| {r.name} | {r.docs:,} | {r.tokens:,} | {r.weight:g} | {r.epochs:.3f} | "
                       f"{r.mixed_docs:,} | {r.mixed_tokens:,} | {100 * r.mixed_tokens / total:.1f}% |")
        return "\n".join(out)


def plan_mix(names: list[str], doc_tokens: list[np.ndarray], weights: list[float],
             config: MixConfig | None = None) -> MixPlan:
    """Decide which documents (with repeats) of each source go into the mix; see the module docstring.

    ``doc_tokens[i]`` holds the token count of every document of source ``names[i]``.
    """
    config = config or MixConfig()
    if not (len(names) == len(doc_tokens) == len(weights)):
        raise ValueError("names, doc_tokens and weights must have the same length")
    if any(w < 0 for w in weights):
        raise ConfigError("source weight: must be >= 0")
    sizes = [int(np.asarray(t).sum()) for t in doc_tokens]
    if config.by == "epochs":
        epochs = [float(w) for w in weights]
    else:
        wsum = sum(weights)
        if wsum <= 0:
            raise ConfigError("mix: with by = 'tokens' at least one source needs a weight > 0")
        budget = config.total_tokens or sum(sizes)
        epochs = [(w / wsum) * budget / s if s else 0.0 for w, s in zip(weights, sizes)]
    rng = np.random.default_rng(config.seed)
    rows, picks = [], []
    for i, (name, tokens, e) in enumerate(zip(names, doc_tokens, epochs)):
        tokens = np.asarray(tokens, dtype=np.int64)
        full, frac = int(e), e - int(e)
        chosen = [np.tile(np.arange(len(tokens)), full)]
        if frac > 0 and len(tokens):
            perm = rng.permutation(len(tokens))
            cum = np.cumsum(tokens[perm])
            take = int(np.searchsorted(cum, frac * sizes[i])) + 1  # the smallest prefix reaching the target
            chosen.append(perm[: min(take, len(perm))])
        idx = np.concatenate(chosen)
        rows.append(SourceMix(name, len(tokens), sizes[i], float(weights[i]), e, len(idx), int(tokens[idx].sum())))
        picks.append(np.stack([np.full(len(idx), i), idx], axis=1))
    order = np.concatenate(picks) if picks else np.zeros((0, 2), dtype=np.int64)
    order = order[rng.permutation(len(order))]
    return MixPlan(rows, order.astype(np.int64))
