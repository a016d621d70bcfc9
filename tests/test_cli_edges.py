"""Edge handling shared by every command: umask-honouring atomic writes, `model convert` never destroying data,
`eval bench` keeping finished tasks, and the one-line error helpers."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import ConfigError, LmstackError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_honour_the_umask(tmp_path, umask_022):
    from lmstack.runs import atomic_dir, atomic_write_text

    f = atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(f.stat().st_mode) == 0o644  # mkstemp alone gives 0600
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone gives 0700
    os.umask(0o077)
    assert stat.S_IMODE(atomic_write_text(tmp_path / "b.txt", "x").stat().st_mode) == 0o600


def test_atomic_write_into_a_file_path_is_one_line(tmp_path):
    from lmstack.runs import atomic_write_text

    (tmp_path / "f").write_text("keep")
    with pytest.raises(LmstackError, match="a parent of this path is a file"):
        atomic_write_text(tmp_path / "f" / "x.json", "{}")
    assert (tmp_path / "f").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.fixture
def model_dir(tmp_path):
    from lmstack.model import build_model, preset, save

    torch.manual_seed(0)
    return save(build_model(preset("tiny", vocab_size=64, n_layer=1, d_model=16, n_head=2, n_kv_head=2,
                                   max_seq_len=32)), tmp_path / "m")


def test_model_convert_refuses_to_destroy_data(model_dir, tmp_path, capsys):
    run = tmp_path / "run"  # a run directory: model files plus things a conversion must not delete
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoints").mkdir()
    assert main(["model", "convert", str(model_dir), str(model_dir)]) == 2
    assert main(["model", "convert", str(model_dir), str(tmp_path)]) == 2          # OUT holds SRC
    assert main(["model", "convert", str(model_dir), str(run)]) == 2
    (tmp_path / "file").write_text("mine")
    assert main(["model", "convert", str(model_dir), str(tmp_path / "file"), "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: OUT ") and "is SRC or holds it" in err[0]
    assert "not a model folder (it holds checkpoints, metrics.jsonl)" in err[2] and "--force" in err[2]
    assert "is a file" in err[3]
    assert (run / "metrics.jsonl").is_file() and (tmp_path / "file").read_text() == "mine"
    assert (model_dir / "model.safetensors").is_file()
    # a new folder, then the same folder again (a model folder: replaced), then --force over the run
    assert main(["model", "convert", str(model_dir), str(tmp_path / "hf")]) == 0
    assert main(["model", "convert", str(model_dir), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["model", "convert", str(model_dir), str(run), "--force"]) == 0
    assert (run / "config.json").is_file() and not (run / "metrics.jsonl").exists()


def test_eval_bench_keeps_finished_tasks_when_one_fails(tmp_path, capsys):
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    tok = train_bpe(["a cat sat on the mat. the dog ran. " * 20], vocab_size=280)
    torch.manual_seed(0)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=16, n_head=2, n_kv_head=2,
                            max_seq_len=32)), tmp_path / "m")
    tok.save(tmp_path / "m")
    (tmp_path / "held.txt").write_text("a cat sat.\n\nthe dog ran.\n", encoding="utf-8")
    (tmp_path / "good.yaml").write_text("kind: perplexity\nformat: text\npath: held.txt\n", encoding="utf-8")
    (tmp_path / "bad.yaml").write_text("kind: perplexity\nformat: text\npath: missing.txt\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    code = main(["eval", "bench", str(tmp_path / "m"), "--tasks", f"{tmp_path / 'good.yaml'},{tmp_path / 'bad.yaml'}",
                 "--data-dir", str(tmp_path), "--json", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad: failed: " in err and "missing.txt: no such data file" in err
    assert f"error: 1 of 2 tasks failed (bad); the 1 finished are in {out}" in err
    data = json.loads(out.read_text())
    assert [t["name"] for t in data["tasks"]] == ["good"] and data["tasks"][0]["n"] == 2
    assert data["failed"] == [{"name": "bad", "error": f"{tmp_path / 'missing.txt'}: no such data file "
                                                      "(task paths are relative to --data-dir)"}]


def test_config_errors_are_one_line(tmp_path):
    from lmstack.config import read_config_file

    (tmp_path / "a.yaml").write_text("a: 1\nb:\n  c: 2\n   d: [3\n")
    with pytest.raises(ConfigError) as e:
        read_config_file(tmp_path / "a.yaml")
    assert str(e.value) == f"{tmp_path / 'a.yaml'}: cannot parse (mapping values are not allowed here at line 4, " \
                           "column 5)"
    (tmp_path / "b.toml").write_bytes(b"x = '\xff'\n")
    with pytest.raises(ConfigError, match=r"b.toml: not UTF-8 text \(byte 5\); save the config as UTF-8"):
        read_config_file(tmp_path / "b.toml")


def test_missing_extra_names_the_extra(monkeypatch):
    import sys

    from lmstack.extras import MissingExtraError, require

    monkeypatch.delitem(sys.modules, "sacrebleu.metrics", raising=False)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # what an environment without it looks like to import
    with pytest.raises(MissingExtraError) as e:
        require("sacrebleu.metrics", "the bleu metric")
    assert str(e.value) == ("the bleu metric needs the package 'sacrebleu', which is not installed: "
                            'pip install "lmstack[eval]"')
