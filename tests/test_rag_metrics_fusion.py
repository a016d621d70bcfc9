"""lmstack.rag.metrics and lmstack.rag.fusion on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmstack.errors import ConfigError
from lmstack.rag import (
    average_precision,
    evaluate,
    hit_rate,
    mmr,
    ndcg,
    precision,
    recall,
    reciprocal_rank,
    reciprocal_rank_fusion,
    squad_exact_match,
    squad_f1,
    suppress_near_duplicates,
    weighted_fusion,
)

RANKED = ["d1", "d2", "d3", "d4", "d5"]
REL = {"d2", "d4", "d9"}


def test_binary_metrics_by_hand():
    assert (hit_rate(RANKED, REL, 1), hit_rate(RANKED, REL, 2)) == (0.0, 1.0)
    assert recall(RANKED, REL, 2) == pytest.approx(1 / 3) and recall(RANKED, REL, 5) == pytest.approx(2 / 3)
    assert precision(RANKED, REL, 2) == 0.5 and precision(RANKED, REL, 5) == pytest.approx(2 / 5)
    assert reciprocal_rank(RANKED, REL) == 0.5 and reciprocal_rank(RANKED, REL, k=1) == 0.0
    assert average_precision(RANKED, REL) == pytest.approx((1 / 2 + 2 / 4) / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg(RANKED, REL, 5) == pytest.approx(dcg / idcg) == pytest.approx(0.498189, abs=1e-6)
    assert ndcg(RANKED, set(), 5) == 0.0 and reciprocal_rank(RANKED, {"zz"}) == 0.0


def test_graded_ndcg_by_hand():
    rel = {"a": 3, "b": 2, "c": 1}
    ranked = ["c", "x", "a", "b"]
    dcg = 1 + 3 / math.log2(4) + 2 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg(ranked, rel, 4) == pytest.approx(dcg / idcg) == pytest.approx(0.705891, abs=1e-6)
    dcg_exp = 1 + 7 / math.log2(4) + 3 / math.log2(5)
    idcg_exp = 7 + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg(ranked, rel, 4, gain="exp") == pytest.approx(dcg_exp / idcg_exp)
    assert ndcg(["a", "b", "c"], rel, 3) == 1.0


def test_repeated_documents_count_once_and_evaluate_means():
    assert precision(["d2", "d2", "d4"], REL, 2) == 1.0
    out = evaluate([RANKED, ["d9"]], [REL, {"d9"}], ks=(1, 5), ndcg_k=5)
    assert out["recall@1"] == pytest.approx((0 + 1) / 2) and out["mrr"] == pytest.approx((0.5 + 1) / 2)
    assert out["hit_rate@5"] == 1.0 and set(out) >= {"precision@5", "map", "ndcg@5"}
    with pytest.raises(ConfigError, match="k must be >= 1"):
        recall(RANKED, REL, 0)


def test_squad_answer_metrics_use_the_official_normalisation():
    assert squad_exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # pred {denver, broncos}, gold {broncos}: P = 1/2, R = 1 -> F1 = 2/3; the best answer counts
    assert squad_f1("Denver Broncos", ["the Broncos", "Carolina"]) == pytest.approx(2 / 3)
    assert squad_f1("nothing", ["Broncos"]) == 0.0


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([["x", "y", "z"], ["y", "w"]])
    assert [i for i, _ in fused] == ["y", "x", "w", "z"]
    assert dict(fused)["y"] == pytest.approx(1 / 62 + 1 / 61) and dict(fused)["z"] == pytest.approx(1 / 63)
    weighted = reciprocal_rank_fusion([["x"], ["y"]], k=0, weights=[1.0, 2.0])
    assert weighted == [("y", 2.0), ("x", 1.0)]


def test_weighted_fusion_min_max_by_hand():
    fused = weighted_fusion([{"x": 3.0, "y": 1.0, "z": 2.0}, {"y": 10.0, "w": 0.0}], [0.5, 0.5])
    assert fused == [("x", 0.5), ("y", 0.5), ("z", 0.25), ("w", 0.0)]
    assert weighted_fusion([{"a": 4.0, "b": 4.0}]) == [("a", 1.0), ("b", 1.0)]
    with pytest.raises(ConfigError, match="expected 2"):
        weighted_fusion([{}, {}], [1.0])


def test_mmr_skips_a_duplicate():
    d0 = np.array([0.9, math.sqrt(1 - 0.81)])
    vecs = np.stack([d0, d0, np.array([0.7, -math.sqrt(1 - 0.49)])])
    q = np.array([1.0, 0.0])
    assert mmr(q, vecs, 3, lambda_=0.5) == [0, 2, 1]  # d1 repeats d0: 0.45 - 0.5 < 0.35 - 0.5 * sim(d2, d0)
    assert mmr(q, vecs, 3, lambda_=1.0) == [0, 1, 2]
    assert mmr(q, vecs, 0) == []


def test_near_duplicates_are_suppressed():
    texts = ["the quick brown fox jumps over", "The quick brown fox jumps over!", "something else entirely here"]
    assert suppress_near_duplicates(texts, threshold=0.9) == [0, 2]
    v = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]])
    assert suppress_near_duplicates(vectors=v, threshold=0.95) == [0, 2]
