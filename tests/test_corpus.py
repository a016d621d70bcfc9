import json

from lmstack.data.corpus import CorpusConfig, build_default_corpus, clean_docstring


def test_clean_docstring_simplifies_rest_and_drops_doctests():
    assert clean_docstring("Use :func:`os.path.join` and ``x``.") == "Use os.path.join and x."
    assert clean_docstring(">>> 1 + 1\n2\n>>> 2\n") is None


def test_default_corpus_is_real_prose_deduplicated_and_deterministic(tmp_path):
    cfg = CorpusConfig(sources=("topics",))
    a = build_default_corpus(tmp_path / "a", cfg)
    b = build_default_corpus(tmp_path / "b", cfg)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert a["documents"] == b["documents"] > 50 and a["bytes"] > 300_000
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    assert all(len(t) >= cfg.min_chars for t in texts)
    assert any("statement" in t for t in texts)
