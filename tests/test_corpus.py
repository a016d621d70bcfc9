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


def test_default_corpus_goes_through_the_data_pipeline_steps(tmp_path):
    from lmstack.data.corpus import corpus_report

    stats = build_default_corpus(tmp_path, CorpusConfig(sources=("docstrings",)))
    names = [s["name"] for s in stats["steps"]]
    assert names == ["unicode", "boilerplate", "tables", "language", "quality", "pii", "exact_dedup", "near_dedup"]
    by_name = {s["name"]: s for s in stats["steps"]}
    assert by_name["exact_dedup"]["removed"]["exact_duplicate"] > 0 and by_name["tables"]["modified"] > 0
    text = (tmp_path / "train.jsonl").read_text()
    assert "+=====" not in text and "-----+" not in text     # reST table rules are gone
    report = corpus_report(stats)
    assert "| exact_dedup |" in report and "exact_duplicate:" in report  # counts and an example per reason


def test_table_rules_step_keeps_prose_and_drops_rules():
    from lmstack.data.clean import Reject, TableRules

    step = TableRules()
    assert step("Title\n+----+----+\n| a  | b  |\n====  ====\n|---|:--:|\nkeep - this -- line") == \
        "Title\n| a  | b  |\nkeep - this -- line"
    assert isinstance(step("-----\n=====\n"), Reject)


def test_user_inputs_go_through_dedup_and_the_heldout_rule(tmp_path):
    from lmstack.data.corpus import build_user_corpus
    from lmstack.data.split import is_heldout

    docs = [f"Story number {i}: a fox and a crow talk about the weather, the river and the hill {i}." for i in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:5]))
    stats = build_user_corpus([str(tmp_path / "in.jsonl")], tmp_path / "out", CorpusConfig(valid_fraction=0.2))
    assert stats["removed"]["exact_dedup"] == 5 and stats["documents"] <= 60
    held = [json.loads(x)["text"] for x in (tmp_path / "out" / "valid.jsonl").read_text().splitlines()]
    assert held and all(is_heldout(t, 0.2) for t in held)
