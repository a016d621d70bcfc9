"""``lmstack prompt ...``: the registry commands, one-line errors with exit 2, and ``prompt test`` exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def db(tmp_path):
    return ["--db", str(tmp_path / "reg.sqlite")]


def test_add_show_diff_log_label_rollback(db, tmp_path, capsys):
    assert main(["prompt", "add", "qa", "--instruction", "Be terse.", "--input", "{{ question }}", "-m", "first",
                 "--label", "production", *db]) == 0
    assert main(["prompt", "add", "qa", "--from", "qa@production", "--instruction", "Be kind.", "-m", "kinder",
                 *db]) == 0
    assert capsys.readouterr().out == "added qa@1 (label production)\nadded qa@2\n"
    assert main(["prompt", "diff", "qa@2", *db]) == 0
    assert "-instruction: Be terse.\n+instruction: Be kind.\n" in capsys.readouterr().out
    assert main(["prompt", "label", "qa", "production", "2", *db]) == 0
    assert main(["prompt", "rollback", "qa", "production", *db]) == 0
    assert capsys.readouterr().out == "qa@production: 1 -> 2\nqa@production: 2 -> 1 (rolled back)\n"
    assert main(["prompt", "show", "qa@production", "--render", "question=hi", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == [{"role": "system", "content": "Be terse."},
                                                   {"role": "user", "content": "hi"}]
    assert main(["prompt", "log", "qa", "--json", *db]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["labels"], r["message"]) for r in log] == [(2, [], "kinder"), (1, ["production"], "first")]


def test_export_import_via_cli(db, tmp_path, capsys):
    spec = tmp_path / "qa.yaml"
    spec.write_text("instruction: |\n  Answer.\n  Briefly.\ninput: '{{ q }}'\nexamples:\n- {input: a, output: b}\n",
                    encoding="utf-8")
    assert main(["prompt", "add", "qa", "--file", str(spec), *db]) == 0
    assert main(["prompt", "export", str(tmp_path / "out"), *db]) == 0
    other = ["--db", str(tmp_path / "other.sqlite")]
    assert main(["prompt", "import", str(tmp_path / "out"), *other]) == 0
    assert capsys.readouterr().out.endswith("qa: 1 version(s), 0 label move(s) added\n")
    assert main(["prompt", "show", "qa@1", "--json", *other]) == 0
    assert json.loads(capsys.readouterr().out)["template"]["instruction"] == "Answer.\nBriefly.\n"


@pytest.mark.parametrize("argv, message", [
    (["prompt", "show", "qa@canary"], "error: prompt 'qa' has no label 'canary'; its labels: (none)\n"),
    (["prompt", "rollback", "qa", "canary"], "error: prompt 'qa' has no label 'canary'; nothing to roll back\n"),
    (["prompt", "show", "nope"], "error: no prompt named 'nope' in the registry; it has qa\n"),
    (["prompt", "add", "qa", "--input", "{{ x"],
     ("error: prompt 'qa' field 'input': template syntax error at line 1: unexpected end of template, expected "
      "'end of print statement'.\n")),
    (["prompt", "label", "qa", "production", "5"], "error: prompt 'qa' has no version 5\n"),
])
def test_bad_input_is_one_line_exit_2(db, capsys, argv, message):
    assert main(["prompt", "add", "qa", "--input", "{{ q }}", *db]) == 0
    capsys.readouterr()
    assert main([*argv, *db]) == 2
    assert capsys.readouterr().err == message


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from lmstack.cli import main\n"
            "try:\n    main(['prompt', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'jinja2', 'sqlite3', 'lmstack.prompts.registry') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)},
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_plain_show_and_label_log(db, capsys, monkeypatch):
    monkeypatch.setenv("LMSTACK_AUTHOR", "ann")
    assert main(["prompt", "add", "qa", "--input", "{{ q }}", "--example", "a", "b", "-m", "why\nmore",
                 "--label", "prod", *db]) == 0
    assert main(["prompt", "rollback", "qa", "prod", "--to", "1", "-m", "same", *db]) == 0
    capsys.readouterr()
    assert main(["prompt", "show", "qa", *db]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# qa@1  ") and out[0].endswith("  ann  [prod]") and out[1:3] == ["# why", "# more"]
    assert out[3:] == ["instruction: ''", "context: ''", "input: '{{ q }}'", "output_format: ''", "examples:",
                       "- input: a", "  output: b"]
    assert main(["prompt", "log", "qa", "--labels", *db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  ", 1)[1] for ln in lines] == ["prod: - -> 1  (set, ann)  why", "prod: 1 -> 1  (rollback, ann)  same"]
    assert main(["prompt", "log", *db]) == 0 and capsys.readouterr().out == "qa\n"


@pytest.mark.parametrize("argv", [["prompt", "show", "qa"], ["prompt", "log", "qa"], ["prompt", "export", "out"],
                                  ["prompt", "add", "qa", "--input", "{% if %}"],
                                  ["prompt", "add", "qa", "--from", "qa@1", "--input", "x"],
                                  ["prompt", "add", "bad name", "--input", "x"]])
def test_failing_commands_leave_no_registry_behind(tmp_path, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--db", "reg.sqlite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
