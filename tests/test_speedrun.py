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


def test_cloze_items_cut_on_spaces_and_hide_the_answer_position():
    from lmstack.speedrun import cloze_items

    texts = [f"Document {i} says that alpha{i} beta{i} gamma{i} delta{i} epsilon{i} zeta{i} eta{i} theta{i}."
             for i in range(8)]
    items = cloze_items(texts, 6, 20, 25, seed=0)
    assert len(items) == 6
    for i, item in enumerate(items):
        assert not item["query"].endswith(" ") and texts[i].startswith(item["query"] + " ")
        true = item["choices"][item["gold"]]
        assert texts[i].startswith(item["query"] + " " + true)
        assert len(set(item["choices"])) == 4
    assert len({it["gold"] for it in items}) > 1


def test_whole_speedrun_end_to_end_tiny(tmp_path):
    """Every stage on the real default corpus, shrunk to seconds; then a resume that redoes nothing."""
    run = tmp_path / "run"
    args = ["speedrun", "--run-dir", str(run), "--corpus.sources", "[topics]", "--tokenizer.vocab_size", "512",
            "--pretrain.steps", "12", "--pretrain.batch_size", "4", "--pretrain.seq_len", "64",
            "--pretrain.eval_every", "6", "--pretrain.ckpt_every", "6",
            "--pretrain.model", "{preset: tiny, n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 2}",
            "--generate.max_new_tokens", "8", "--generate.speculative_prompts", "1",
            "--sft.steps", "3", "--evaluate.heldout_documents", "5", "--evaluate.generation_items", "2",
            "--evaluate.choice_items", "4"]
    assert main(args) == 0
    report = (run / "report.md").read_text()
    for heading in ("## Corpus", "## Tokenizer", "## Pre-training", "## Generation", "## Supervised fine-tuning",
                    "## Evaluation"):
        assert heading in report
    assert (run / "pretrain" / "loss.png").is_file() and (run / "pretrain" / "model.safetensors").is_file()
    summary = read_json(run / "stages" / "pretrain.json")["results"]
    assert summary["steps"] == 12 and summary["val_loss"] < 6.3  # ln(512) = 6.24 is a uniform guess
    before = {p.name: p.stat().st_mtime_ns for p in (run / "stages").iterdir()}
    assert main(args) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "stages").iterdir()}


def test_shipped_configs_load_and_the_speedrun_one_matches_the_defaults():
    from pathlib import Path

    from lmstack.config import load_config, to_dict
    from lmstack.speedrun import SpeedrunConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    assert to_dict(load_config(SpeedrunConfig, root / "speedrun_tiny.toml")) == to_dict(SpeedrunConfig())
