import argparse
import json

import pytest

from lmstack.cli import main
from lmstack.runs import read_json


def _write_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"Document number {i} talks about tokenizers, models and training loops."} for i in range(40)]
    (data / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def test_speedrun_stage_resumes_and_reruns_on_config_change(tmp_path, capsys):
    data = _write_inputs(tmp_path)
    run = tmp_path / "run"
    args = ["speedrun", "--run-dir", str(run), "--stages", "corpus", "--inputs", str(data)]
    assert main(args) == 0
    first = read_json(run / "stages" / "corpus.json")
    assert first["results"]["documents"] == 40
    assert (run / "report.md").read_text().count("## Corpus") == 1
    assert "<table>" in (run / "report.html").read_text()
    assert main(args) == 0
    assert "corpus: done, skipping (resume)" in capsys.readouterr().err
    assert main(args + ["--corpus.valid_fraction", "0.25"]) == 0
    assert "corpus: running" in capsys.readouterr().err


def test_speedrun_bad_config_is_one_line_exit_2(tmp_path, capsys):
    assert main(["speedrun", "--run-dir", str(tmp_path), "--tokenizer.vocab_sise", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config field 'tokenizer.vocab_sise' (did you mean 'tokenizer.vocab_size'?)"
    assert main(["speedrun", "--run-dir", str(tmp_path), "--stages", "nope"]) == 2


def test_every_subcommand_has_help_with_examples(capsys):
    from lmstack.cli import build_parser

    def leaves(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, f"{path} {name}")

    found = list(leaves(build_parser(), "lmstack"))
    assert len(found) >= 1
    for path, p in found:
        assert "example" in (p.epilog or ""), f"{path} --help has no examples"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
