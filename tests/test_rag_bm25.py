"""lmstack.rag.bm25: scores equal to rank_bm25.BM25Okapi (floats equal, not close) on SQuAD paragraphs and on
a corpus that exercises the negative-idf floor; the one tokeniser."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack.errors import ConfigError
from lmstack.rag import BM25, bm25_scores, tokenize
from lmstack.rag.bm25 import ENGLISH_STOPWORDS


def squad(shared_data):
    path = shared_data / "rag" / "squad_dev-v1.1.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paras = [p for a in data for p in a["paragraphs"]]
    return [p["context"] for p in paras], [q["question"] for p in paras for q in p["qas"]]


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0)])
def test_equal_to_rank_bm25_on_squad(shared_data, k1, b):
    rank_bm25 = pytest.importorskip("rank_bm25")
    paras, questions = squad(shared_data)
    corpus = [tokenize(p) for p in paras]
    ref = rank_bm25.BM25Okapi(corpus, k1=k1, b=b)
    ours = BM25(corpus, k1=k1, b=b)
    assert ours.avgdl == ref.avgdl and ours.idf == ref.idf
    for q in questions[::211] + ["the the of", "zzzunseen", ""]:
        np.testing.assert_array_equal(ours.scores(tokenize(q)), ref.get_scores(tokenize(q)))


def test_negative_idf_floor_and_repeated_query_terms():
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = [["a", "b", "common"], ["common", "c"], ["common", "a", "a"], ["d", "common"], []]
    ref = rank_bm25.BM25Okapi(corpus)
    # 'common' is in every document: its raw idf is negative and is floored to epsilon * the mean idf
    assert BM25(corpus).idf["common"] == ref.idf["common"] == 0.25 * ref.average_idf > 0
    for q in (["common"], ["a", "a", "common"], ["b", "zz"], []):
        np.testing.assert_array_equal(bm25_scores(q, corpus), ref.get_scores(q))


def test_top_k_ties_and_positive_only():
    engine = BM25([["x"], ["y"], ["x"], ["z"], ["w"], ["v"]])
    assert [r for r, _ in engine.top_k(["x"], 5)] == [0, 2]
    assert engine.top_k(["nothing"], 3) == []


def test_tokenizer_and_errors():
    assert tokenize("The Cat's  café, 2024!") == ["the", "cat", "s", "café", "2024"]
    assert tokenize("The cat is on the mat", ENGLISH_STOPWORDS) == ["cat", "mat"]
    with pytest.raises(ConfigError, match="corpus is empty"):
        BM25([])
