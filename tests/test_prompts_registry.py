"""The prompt registry: concurrent writers, diffs, labels and rollback, YAML round trip, one-line errors."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from lmstack.errors import DataError, LmstackError
from lmstack.prompts.registry import Ref, Registry, SQLiteStore, dump_yaml, open_registry, parse_ref
from lmstack.prompts.template import PromptTemplate

TRICKY = "Line one  \n\ttabbed\n  {{ question }}\n\nunicode: é ✓ \u00a0nbsp\ntrailing newline\n"


def tpl(text: str, **more) -> PromptTemplate:
    return PromptTemplate(instruction=text, input="{{ question }}", **more)


def _writer(path: str, who: int, n: int, barrier) -> None:
    reg = open_registry(path)
    barrier.wait()
    for i in range(n):
        reg.add("shared", tpl(f"writer {who} step {i}"), author=f"w{who}", message=f"step {i}",
                allow_unchanged=True)


def test_two_processes_never_lose_a_version(tmp_path):
    path = str(tmp_path / "reg.sqlite")
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, w, 50, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    log = open_registry(path).log("shared")
    assert [v.version for v in log] == list(range(1, 101))
    assert [v.parent for v in log] == [None] + list(range(1, 100))      # each based on the one before it
    for w in (0, 1):   # every write of each writer is there, in its order
        mine = [v.fields["instruction"] for v in log if v.author == f"w{w}"]
        assert mine == [f"writer {w} step {i}" for i in range(50)]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):   # the constraint behind the transaction
        con.execute("INSERT INTO versions VALUES ('shared', 7, '{}', 'x', 'x', 'x', NULL, '')")


def test_threads_sharing_one_registry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    reg = open_registry(tmp_path / "t.sqlite")

    def write(w):
        for i in range(10):
            reg.add("t", tpl(f"{w}-{i}"), author=str(w))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    log = reg.log("t")
    assert [v.version for v in log] == list(range(1, 41))
    assert sorted(v.fields["instruction"] for v in log) == sorted(f"{w}-{i}" for w in range(4) for i in range(10))


def test_versions_diffs_and_lookup(tmp_path):
    reg = open_registry(tmp_path / "r.sqlite")
    v1 = reg.add("qa", tpl("Be terse."), author="ann", message="first")
    v2 = reg.add("qa", tpl("Be terse and kind."), author="bob", message="kinder")
    assert (v1.version, v1.parent, v2.version, v2.parent) == (1, None, 2, 1)
    assert v2.diff.splitlines()[:2] == ["--- qa@1", "+++ qa@2"]
    assert "-instruction: Be terse.\n+instruction: Be terse and kind.\n" in v2.diff
    assert v1.diff.startswith("--- /dev/null\n+++ qa@1\n")
    assert reg.get("qa").version == 2 and reg.get("qa@1").fields == tpl("Be terse.").fields()
    assert reg.diff("qa@2") == v2.diff
    assert "-instruction: Be terse and kind.\n+instruction: Be terse.\n" in reg.diff("qa@2", "qa@1")
    with pytest.raises(LmstackError, match=r"^prompt 'qa': the template equals version 2; nothing to add$"):
        reg.add("qa", tpl("Be terse and kind."))
    with pytest.raises(LmstackError, match=r"^prompt 'qa' has no version 9; its versions are 1..2$"):
        reg.get("qa@9")
    with pytest.raises(LmstackError, match=r"^no prompt named 'nope' in the registry; it has qa$"):
        reg.get("nope")
    with pytest.raises(LmstackError, match="template syntax error at line 1"):
        reg.add("qa", {"instruction": "{% if %}"})
    assert [v.version for v in reg.log("qa")] == [1, 2]


def test_parse_ref():
    assert parse_ref("qa") == Ref("qa") and parse_ref("qa@latest") == Ref("qa")
    assert parse_ref("qa@3") == Ref("qa", version=3) and parse_ref("qa@prod") == Ref("qa", label="prod")
    for bad, msg in [("qa@", "nothing after '@'"), ("q a", "use letters"), ("qa@0", "versions start at 1")]:
        with pytest.raises(LmstackError, match=msg):
            parse_ref(bad)


def test_labels_move_and_rollback_restores_exact_text(tmp_path):
    reg = open_registry(tmp_path / "r.sqlite")
    reg.add("qa", tpl(TRICKY, examples=[{"input": "x", "output": "y \n"}]), label="production")
    reg.add("qa", tpl("v2"), label="production")
    reg.add("qa", tpl("v3"), label="staging")
    reg.set_label("qa", "production", 3)
    assert reg.labels("qa") == {"production": 3, "staging": 3}
    back = reg.rollback("qa", "production")
    assert (back.version, back.previous, back.kind) == (2, 3, "rollback")
    reg.rollback("qa", "production")                    # a second rollback goes one more move back
    got = reg.get("qa@production")
    assert got.version == 1 and got.fields["instruction"] == TRICKY and got.fields["examples"][0]["output"] == "y \n"
    with pytest.raises(LmstackError, match="no earlier version to roll back to"):
        reg.rollback("qa", "production")
    assert reg.rollback("qa", "production", to=3).version == 3
    hist = reg.label_history("qa", "production")
    assert [(m.version, m.previous, m.kind) for m in hist] == [
        (1, None, "set"), (2, 1, "set"), (3, 2, "set"), (2, 3, "rollback"), (1, 2, "rollback"), (3, 1, "rollback")]
    with pytest.raises(LmstackError, match=r"^prompt 'qa' has no label 'canary'; its labels: production, staging$"):
        reg.get("qa@canary")
    with pytest.raises(LmstackError, match=r"^prompt 'qa' has no version 7$"):
        reg.set_label("qa", "production", 7)
    with pytest.raises(LmstackError, match="a label cannot be a number"):
        reg.set_label("qa", "12", 1)


def test_export_import_round_trip_is_exact(tmp_path):
    reg = open_registry(tmp_path / "a.sqlite")
    reg.add("qa", tpl(TRICKY), author="ann", message="multi\nline message")
    reg.add("qa", tpl("v2", output_format="JSON: {\"a\": 1}"), label="production")
    reg.add("other", PromptTemplate(input="{{ x }}"), label="staging")
    reg.rollback("qa", "production", to=1)
    files = reg.export(tmp_path / "out")
    assert sorted(f.name for f in files) == ["other.yaml", "qa.yaml"]
    text = (tmp_path / "out" / "qa.yaml").read_text(encoding="utf-8")
    assert text.startswith("format: 1\nname: qa\nlabels:\n  production: 1\nversions:\n- version: 1\n")
    assert "message: |-\n    multi\n    line message\n" in text    # block scalars: readable diffs

    fresh = open_registry(tmp_path / "b.sqlite")
    assert fresh.import_files([tmp_path / "out"]) == {"other": (1, 1), "qa": (2, 2)}
    for name in ("qa", "other"):
        assert fresh.log(name) == reg.log(name)
        assert fresh.label_history(name) == reg.label_history(name)
    fresh.export(tmp_path / "again")
    for f in files:
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    assert fresh.import_files([tmp_path / "out"]) == {"other": (0, 0), "qa": (0, 0)}   # idempotent

    reg.add("qa", tpl("v3"))                              # the file is older: the newer version is added
    reg.export(tmp_path / "out")
    assert fresh.import_files([tmp_path / "out" / "qa.yaml"]) == {"qa": (1, 0)}
    fresh.add("qa", tpl("diverged"))
    reg.add("qa", tpl("v4"))
    reg.export(tmp_path / "out")
    with pytest.raises(LmstackError, match="^import 'qa': version 4 differs from the registry's"):
        fresh.import_files([tmp_path / "out" / "qa.yaml"])


def test_bad_yaml_files(tmp_path):
    reg = open_registry(tmp_path / "r.sqlite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: qa\nversions:\n- version: 2\n  template: {input: x}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"versions\[0\]: version 2, expected 1"):
        reg.import_files([bad])
    bad.write_text(dump_yaml({"name": "qa", "labels": {"prod": 1}, "versions": [
        {"version": 1, "parent": None, "author": "a", "created": "t", "message": "", "template": {"input": "x"}}]}),
        encoding="utf-8")
    with pytest.raises(DataError, match="'labels' .* disagree with the label history"):
        reg.import_files([bad])
    bad.write_text("a: [\n", encoding="utf-8")
    with pytest.raises(DataError, match="not valid YAML"):
        reg.import_files([bad])


def test_store_is_lazy_and_urls(tmp_path):
    SQLiteStore(tmp_path / "never.sqlite")
    assert not (tmp_path / "never.sqlite").exists()
    assert isinstance(open_registry(f"sqlite:///{tmp_path / 'x.sqlite'}"), Registry)
    with pytest.raises(LmstackError, match="PostgreSQL prompt storage is not implemented"):
        open_registry("postgresql://u:secret@host/db")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LmstackError, match="not a usable SQLite database"):
        open_registry(tmp_path / "junk.sqlite").names()
