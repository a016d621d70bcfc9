import json
import os

import pytest

from lmstack.errors import DataError
from lmstack.runs import (JsonlLogger, atomic_dir, atomic_path, atomic_write_json, list_checkpoints, checkpoint_dir,
                          prune_checkpoints, read_json, read_jsonl)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert read_json(target) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temp file left behind


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "a.txt").write_text("two")
            raise ValueError
    assert (d / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_read_json_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        read_json(bad)
    with pytest.raises(DataError, match="file not found"):
        read_json(tmp_path / "missing.json")


def test_jsonl_logger_and_checkpoint_pruning(tmp_path):
    with JsonlLogger(tmp_path / "metrics.jsonl") as log:
        log.log({"step": 1, "loss": 2.5})
        log.log({"step": 2, "loss": 2.0})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [2.5, 2.0] and all("time" in r for r in rows)
    for step in (10, 20, 30, 40):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    best = checkpoint_dir(tmp_path, 10)
    prune_checkpoints(tmp_path, keep_last=2, keep=(best,))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000030", "step_00000040"]
    json.dumps({})


def test_progress_plain_lines_carry_the_latest_metrics(capsys):
    from lmstack.runs import Progress

    p = Progress(4, desc="train", unit="step", print_every=0.0)
    p.update(0, loss=2.5, tok_s=100)
    p.update(1)
    err = capsys.readouterr().err
    assert "train 1/4 step" in err and "loss=2.5" in err and "tok_s=100" in err and "eta" in err


def test_saved_models_honour_the_umask_even_where_the_writer_makes_0600_files(tmp_path):
    import os

    from lmstack.model import build_model, preset, save

    old = os.umask(0o022)
    try:
        save(build_model(preset("tiny", vocab_size=64, d_model=32, n_head=2, n_layer=1)), tmp_path / "m")
    finally:
        os.umask(old)
    # safetensors writes its own file with mode 0600; atomic_path sets the mode after the writer ran
    assert oct((tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
