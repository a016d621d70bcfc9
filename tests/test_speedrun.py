import argparse
import json
import math

import pytest

from lmstack.cli import main
from lmstack.runs import read_json


def _write_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    import random

    rng = random.Random(0)   # distinct documents: the corpus stage removes exact and near duplicates
    words = "tokenizer model training loop batch loss gradient layer attention cache decode sample".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(30))} for i in range(40)]
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


def test_fresh_rerun_keeps_the_runs_settings_and_lists_stale_stages(tmp_path, capsys):
    data = _write_inputs(tmp_path)
    run = tmp_path / "run"
    assert main(["speedrun", "--run-dir", str(run), "--stages", "corpus,tokenizer", "--inputs", str(data),
                 "--tokenizer.vocab_size", "300"]) == 0
    saved = read_json(run / "config.json")
    capsys.readouterr()
    # the README's "rerun one stage", with no overrides: the run's own settings, not the defaults
    assert main(["speedrun", "--run-dir", str(run), "--stages", "corpus", "--fresh"]) == 0
    err = capsys.readouterr().err
    assert f"settings from {run / 'config.json'}" in err
    assert read_json(run / "config.json") == saved
    assert read_json(run / "stages" / "corpus.json")["results"]["documents"] == 40  # --inputs kept
    assert "now stale (built from older inputs or settings): tokenizer;" in err
    # the stale stage is redone by a plain resume, and is then current
    assert main(["speedrun", "--run-dir", str(run), "--stages", "corpus,tokenizer"]) == 0
    err = capsys.readouterr().err
    assert "corpus: done, skipping (resume)" in err and "tokenizer: running" in err and "stale" not in err
    tok = json.loads((run / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + len(tok["added_tokens"]) == 300  # the saved vocab_size, not the default


def test_failed_first_run_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["speedrun", "--run-dir", str(run), "--stages", "corpus", "--inputs", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not run.exists()


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
    from lmstack.eval.cloze import cloze_items

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
            "--embed.epochs", "2", "--embed.dim", "16",
            "--pretrain.steps", "30", "--pretrain.batch_size", "4", "--pretrain.seq_len", "64",
            "--pretrain.eval_every", "6", "--pretrain.ckpt_every", "6",
            "--pretrain.model", "{preset: tiny, n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 2}",
            "--generate.max_new_tokens", "8", "--generate.speculative_prompts", "1",
            "--sft.steps", "3", "--evaluate.heldout_documents", "5", "--evaluate.generation_items", "2",
            "--evaluate.choice_items", "4", "--distill.steps", "6",
            "--prompts.json_requests", "2", "--prompts.cases", "1", "--prompts.repeats", "1",
            "--prompts.redteam_per_category", "1", "--serve.seconds", "0.3", "--serve.clients", "2",
            "--serve.max_tokens", "4", "--monitor.users", "4", "--monitor.per_user", "1",
            "--monitor.second_users", "2", "--monitor.dpo_steps", "1", "--monitor.max_tokens", "4"]
    assert main(args) == 0
    report = (run / "report.md").read_text()
    for heading in ("## Corpus", "## Tokenizer", "## Static word embeddings", "## Pre-training", "## Generation", "## Supervised fine-tuning",
                    "## Evaluation", "## Compression", "## Distillation", "## Prompts", "### Structured output",
                    "### Red-team report", "## Serving", "## Monitoring", "### Drift on a simulated week",
                    "### The loop closed"):
        assert heading in report
    assert "| exact_dedup |" in report                          # the corpus went through the data pipeline
    rows = {r["name"]: r for r in read_json(run / "stages" / "compress.json")["results"]["rows"]}
    assert set(rows) == {"pretrain (fp32)", "int8", "w8a8", "int4"}
    assert rows["int8"]["size_bytes"] < rows["pretrain (fp32)"]["size_bytes"] and rows["int8"]["kld_mean"] < 0.05
    assert main(["generate", str(run / "compress" / "int4"), "--prompt", "The", "--max-new-tokens", "4"]) == 0
    distill = read_json(run / "stages" / "distill.json")["results"]
    assert distill["student_layers"] == 1 and math.isfinite(distill["distilled"]["val_loss"])
    assert (run / "pretrain" / "loss.png").is_file() and (run / "pretrain" / "model.safetensors").is_file()
    summary = read_json(run / "stages" / "pretrain.json")["results"]
    # a uniform guess over the 512 tokens scores ln(512) = 6.24; 30 steps reach about 5.6 on this corpus
    assert summary["steps"] == 30 and summary["val_loss"] < math.log(512) - 0.3
    assert "identical to the model alone's (compared)" in report
    before = {p.name: p.stat().st_mtime_ns for p in (run / "stages").iterdir()}
    assert main(args) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (run / "stages").iterdir()}


def test_shipped_configs_load_and_the_speedrun_one_matches_the_defaults():
    from pathlib import Path

    from lmstack.config import load_config, to_dict
    from lmstack.speedrun import SpeedrunConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    assert to_dict(load_config(SpeedrunConfig, root / "speedrun_tiny.toml")) == to_dict(SpeedrunConfig())


def test_the_distill_stage_starts_its_student_from_the_pruned_teacher(tmp_path):
    import lmstack.model as lm
    from lmstack.errors import ConfigError
    from lmstack.infer.text import load_run
    from lmstack.model import build_model, preset
    from lmstack.speedrun import DistillStageConfig, _pruned_student
    from lmstack.train.data import byte_tokenizer

    run = tmp_path / "run"
    teacher = build_model(preset("tiny", vocab_size=257, d_model=32, n_layer=4, n_head=2))
    lm.save(teacher, run / "pretrain")
    byte_tokenizer().save(run)
    student, tok = load_run(_pruned_student(run, 2))
    assert student.config == teacher.config.replace(n_layer=2) and tok.vocab_size == 257
    assert _pruned_student(run, 0) == run / "pretrain"
    with pytest.raises(ConfigError, match=r"^distill.student_init: 'pruned' or 'random', got 'zero'"):
        DistillStageConfig(student_init="zero")


@pytest.mark.parametrize("section,field,value,message", [
    ("dpo", "steps", 0, r"^dpo.steps: must be >= 1, got 0$"),
    ("dpo", "beta", 0.0, r"^dpo.beta: must be > 0, got 0.0$"),
    ("grpo", "grpo_steps", 0, r"^grpo.grpo_steps: must be >= 1, got 0$"),
    ("rag", "questions", -3, r"^rag.questions: must be >= 1, got -3$"),
    ("prompts", "repeats", 0, r"^prompts.repeats: must be >= 1, got 0$"),
])
def test_alignment_and_rag_stage_settings_are_checked_when_the_config_loads(section, field, value, message):
    """A bad stage setting fails at load time, before the stages ahead of it spend minutes running."""
    from lmstack.config import from_dict
    from lmstack.errors import ConfigError
    from lmstack.speedrun import SpeedrunConfig

    with pytest.raises(ConfigError, match=message):
        from_dict(SpeedrunConfig, {section: {field: value}})


def test_a_leaf_stage_rerun_does_not_make_later_stages_stale(tmp_path, monkeypatch):
    """embed (a leaf) reruns when its setting changes; the stage after it keeps its result."""
    import lmstack.speedrun as sr

    calls = []

    def fake(name):
        def run(cfg, run_dir):
            calls.append(name)
            return sr.StageResult({"name": name}, f"{name}\n")
        return run

    monkeypatch.setattr(sr, "STAGES", [sr.Stage("corpus", "Corpus", fake("corpus"), ("corpus",)),
                                       sr.Stage("embed", "Embed", fake("embed"), ("embed",), leaf=True),
                                       sr.Stage("pretrain", "Pretrain", fake("pretrain"), ("pretrain",))])
    cfg = sr.SpeedrunConfig(run_dir=str(tmp_path))
    sr._run_stages(cfg, tmp_path, None, False)
    assert calls == ["corpus", "embed", "pretrain"]
    cfg.embed.dim = cfg.embed.dim + 8
    calls.clear()
    assert sr._run_stages(cfg, tmp_path, None, False) == []
    assert calls == ["embed"]                              # pretrain still current
    calls.clear()
    sr._run_stages(cfg, tmp_path, ["corpus"], True)        # a non-leaf upstream rerun: everything after is stale
    assert calls == ["corpus"]
    assert sr._run_stages(cfg, tmp_path, ["corpus"], False) == ["embed", "pretrain"]
