"""Retrieval metrics as the IR literature defines them, for one ranked list (best first) and its relevant set.

- hit_rate@k: 1 if any of the top k is relevant.
- recall@k: |relevant in top k| / |relevant|.
- precision@k: |relevant in top k| / k.
- reciprocal rank: 1 / rank of the first relevant item (0 if none); MRR is its mean over queries.
- average precision: sum over ranks i holding a relevant item of precision@i, divided by |relevant| (MAP is
  its mean over queries).
- nDCG@k: DCG@k / IDCG@k with DCG@k = sum_{i=1..k} gain(rel_i) / log2(i + 1); graded relevance as a
  ``{id: grade}`` map; ``gain="linear"`` (rel, trec_eval) or ``"exp"`` (2^rel - 1, Burges et al.);
  IDCG ranks the grades best first. 0 when nothing is relevant.

A ranked list may repeat an id (two chunks of one document): only its first occurrence counts
(:func:`dedupe`). SQuAD exact match and token F1 are the official definitions, over
:func:`lmstack.eval.metrics.text.normalize_answer` with articles removed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

from lmstack.errors import ConfigError

Relevance = Mapping[Hashable, float] | Iterable[Hashable]


def _grades(relevant: Relevance) -> dict[Hashable, float]:
    if isinstance(relevant, Mapping):
        return {k: float(v) for k, v in relevant.items() if v > 0}
    return {k: 1.0 for k in relevant}


def dedupe(ranked: Sequence[Hashable]) -> list[Hashable]:
    seen: set = set()
    out = []
    for x in ranked:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")


def hit_rate(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    _check_k(k)
    rel = _grades(relevant)
    return float(any(x in rel for x in dedupe(ranked)[:k]))


def recall(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    _check_k(k)
    rel = _grades(relevant)
    return sum(x in rel for x in dedupe(ranked)[:k]) / len(rel) if rel else 0.0


def precision(ranked: Sequence[Hashable], relevant: Relevance, k: int) -> float:
    _check_k(k)
    rel = _grades(relevant)
    return sum(x in rel for x in dedupe(ranked)[:k]) / k


def reciprocal_rank(ranked: Sequence[Hashable], relevant: Relevance, k: int | None = None) -> float:
    rel = _grades(relevant)
    for i, x in enumerate(dedupe(ranked)[:k], 1):
        if x in rel:
            return 1.0 / i
    return 0.0


def average_precision(ranked: Sequence[Hashable], relevant: Relevance, k: int | None = None) -> float:
    rel = _grades(relevant)
    if not rel:
        return 0.0
    found, total = 0, 0.0
    for i, x in enumerate(dedupe(ranked)[:k], 1):
        if x in rel:
            found += 1
            total += found / i
    return total / len(rel)


def ndcg(ranked: Sequence[Hashable], relevant: Relevance, k: int, gain: str = "linear") -> float:
    _check_k(k)
    if gain not in ("linear", "exp"):
        raise ConfigError(f"ndcg gain: unknown {gain!r}; use linear or exp")
    g = (lambda r: r) if gain == "linear" else (lambda r: 2.0 ** r - 1)
    rel = _grades(relevant)
    dcg = sum(g(rel.get(x, 0.0)) / math.log2(i + 1) for i, x in enumerate(dedupe(ranked)[:k], 1))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g(r) / math.log2(i + 1) for i, r in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def evaluate(rankings: Sequence[Sequence[Hashable]], relevants: Sequence[Relevance], ks: Sequence[int] = (1, 5, 20),
             ndcg_k: int = 10) -> dict[str, float]:
    """Mean metrics over queries: recall/hit_rate/precision@k for each k, mrr, map, ndcg@ndcg_k."""
    if len(rankings) != len(relevants):
        raise ConfigError(f"evaluate: {len(rankings)} rankings but {len(relevants)} relevance sets")
    n = len(rankings)
    if n == 0:
        raise ConfigError("evaluate: no queries")
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall(r, q, k) for r, q in zip(rankings, relevants)) / n
    for k in ks:
        out[f"hit_rate@{k}"] = sum(hit_rate(r, q, k) for r, q in zip(rankings, relevants)) / n
    for k in ks:
        out[f"precision@{k}"] = sum(precision(r, q, k) for r, q in zip(rankings, relevants)) / n
    out["mrr"] = sum(reciprocal_rank(r, q) for r, q in zip(rankings, relevants)) / n
    out["map"] = sum(average_precision(r, q) for r, q in zip(rankings, relevants)) / n
    out[f"ndcg@{ndcg_k}"] = sum(ndcg(r, q, ndcg_k) for r, q in zip(rankings, relevants)) / n
    return out


# ------------------------------------------------------------------------------------------ answer metrics

def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD v1.1 exact match: 1.0 when the normalised prediction equals a normalised answer."""
    from lmstack.eval.metrics.text import exact_match

    return exact_match([prediction], [list(answers)], ignore_articles=True, on_empty="record").per_item[0]


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD v1.1 token F1: the best over answers of the bag-of-tokens F1 of the normalised strings."""
    from lmstack.eval.metrics.text import normalize_answer

    pred = normalize_answer(prediction, ignore_articles=True).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer, ignore_articles=True).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def abstention_precision_recall(abstained: Sequence[bool], unanswerable: Sequence[bool]) -> dict[str, float]:
    """Abstention as a detector of unanswerable questions.

    precision = |abstained and unanswerable| / |abstained| (NaN when it never abstained);
    recall = |abstained and unanswerable| / |unanswerable| (NaN when none is unanswerable);
    also ``abstain_rate_answerable`` (how often it wrongly said "I don't know") and the counts.
    """
    if len(abstained) != len(unanswerable):
        raise ConfigError(f"abstention: {len(abstained)} answers but {len(unanswerable)} labels")
    both = sum(1 for a, u in zip(abstained, unanswerable) if a and u)
    n_abs, n_un = sum(map(bool, abstained)), sum(map(bool, unanswerable))
    n_ans = len(unanswerable) - n_un
    wrong = n_abs - both
    return {"precision": both / n_abs if n_abs else float("nan"), "recall": both / n_un if n_un else float("nan"),
            "abstain_rate_answerable": wrong / n_ans if n_ans else float("nan"),
            "abstained": n_abs, "unanswerable": n_un, "answerable": n_ans}
