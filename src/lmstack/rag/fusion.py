"""Combining and diversifying ranked lists.

- :func:`reciprocal_rank_fusion`: ``score(d) = sum_i w_i / (k + rank_i(d))``, ranks from 1, k=60 (Cormack et
  al. 2009); a list that does not hold ``d`` adds nothing.
- :func:`weighted_fusion`: each list's scores min-max normalised to [0, 1] (a list whose scores are all equal
  gives them 1), then ``sum_i w_i * norm_i(d)``; a list that does not hold ``d`` adds 0.
- :func:`mmr`: maximal marginal relevance (Carbonell & Goldstein 1998): pick
  ``argmax lambda * sim(q, d) - (1 - lambda) * max_{s in picked} sim(d, s)`` over normalised vectors.
- :func:`suppress_near_duplicates`: drop an item whose text (word 3-shingles, Jaccard) or vector (cosine)
  is at least ``threshold`` similar to a better-ranked item that was kept.

Ties keep the order in which items were first seen (the first list first), so results are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from lmstack.errors import ConfigError


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ConfigError(f"fusion weights: expected {n} (one per list), got {len(weights)}")
    return [float(w) for w in weights]


def _sorted(scores: dict[Hashable, float]) -> list[tuple[Hashable, float]]:
    order = {key: i for i, key in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], k: int = 60,
                           weights: Sequence[float] | None = None) -> list[tuple[Hashable, float]]:
    """Fuse ranked id lists (best first) by reciprocal rank; ``(id, score)`` best first."""
    if k < 0:
        raise ConfigError(f"rrf k must be >= 0, got {k}")
    w = _weights(len(rankings), weights)
    scores: dict[Hashable, float] = {}
    for wi, ranking in zip(w, rankings):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + wi / (k + rank)
    return _sorted(scores)


def min_max(scores: Mapping[Hashable, float]) -> dict[Hashable, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return {key: 1.0 for key in scores}
    return {key: (v - lo) / (hi - lo) for key, v in scores.items()}


def weighted_fusion(score_lists: Sequence[Mapping[Hashable, float]], weights: Sequence[float] | None = None
                    ) -> list[tuple[Hashable, float]]:
    """Fuse ``{id: score}`` maps by weighted min-max-normalised scores; ``(id, score)`` best first."""
    w = _weights(len(score_lists), weights)
    scores: dict[Hashable, float] = {}
    for wi, s in zip(w, score_lists):
        for key, v in min_max(s).items():
            scores[key] = scores.get(key, 0.0) + wi * v
    return _sorted(scores)


def mmr(query_vector: np.ndarray, vectors: np.ndarray, k: int, lambda_: float = 0.5) -> list[int]:
    """Indices into ``vectors`` (normalised rows) chosen by maximal marginal relevance, in pick order."""
    if not 0 <= lambda_ <= 1:
        raise ConfigError(f"mmr lambda must be in [0, 1], got {lambda_}")
    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n == 0 or k <= 0:
        return []
    relevance = vectors @ np.asarray(query_vector, dtype=np.float64)
    sim = vectors @ vectors.T
    picked: list[int] = []
    redundancy = np.full(n, -np.inf)
    free = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        value = lambda_ * relevance - (1 - lambda_) * redundancy if picked else relevance
        value = np.where(free, value, -np.inf)
        best = int(np.argmax(value))  # the first maximum: ties go to the better-ranked candidate
        picked.append(best)
        free[best] = False
        redundancy = np.maximum(redundancy, sim[best])
    return picked


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def suppress_near_duplicates(texts: Sequence[str] | None = None, vectors: np.ndarray | None = None,
                             threshold: float = 0.9) -> list[int]:
    """Indices of the items kept (in order) when near-duplicates of better-ranked items are dropped.

    With ``vectors`` (normalised rows) similarity is the cosine; otherwise the Jaccard overlap of the texts'
    word 3-shingles."""
    if vectors is not None:
        v = np.asarray(vectors, dtype=np.float64)
        kept: list[int] = []
        for i in range(len(v)):
            if not kept or float(np.max(v[kept] @ v[i])) < threshold:
                kept.append(i)
        return kept
    if texts is None:
        raise ConfigError("suppress_near_duplicates needs texts or vectors")
    sets = [shingles(t) for t in texts]
    kept = []
    for i, s in enumerate(sets):
        dup = False
        for j in kept:
            union = len(s | sets[j])
            if union and len(s & sets[j]) / union >= threshold:
                dup = True
                break
        if not dup:
            kept.append(i)
    return kept
