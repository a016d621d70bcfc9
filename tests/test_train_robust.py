"""Trainer hardening: no side effects before fit, runs that are never overwritten by accident, exact
checkpoints on SIGINT/SIGTERM (through the CLI, with real signals), resume after torn or corrupt files,
train-specific nonsense values, the dtype record and an MFU that never reads above 100%."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmstack.runs import list_checkpoints, read_json, read_jsonl
from lmstack.train.config import DataConfig, OptimConfig, TrainConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import random

    from lmstack.data.pack import pack_texts
    from lmstack.train.trainer import byte_tokenizer

    rng = random.Random(1)
    words = "a signal stops the loop only between two steps so the checkpoint is exact".split()
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(100)]
    path = tmp_path_factory.mktemp("shards") / "train"
    pack_texts(texts, byte_tokenizer(), path, workers=1)
    return str(path)


def tiny(run_dir, shards, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), steps=6, batch_size=4, log_every=1, eval_every=0, eval_batches=2,
                ckpt_every=2, sample_prompts=[], dtype="fp32", peak_tflops=1.0, threads=1,
                model={"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2, "dropout": 0.1},
                optim=OptimConfig(lr=1e-2, warmup_steps=2), data=DataConfig(train=[shards], seq_len=32, workers=1))
    base.update(kw)
    return TrainConfig(**base)


def write_config(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(cfg), default=str))
    return path


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture
def main():
    from lmstack.cli import main

    return main


# ---------------------------------------------------------------------------------------------------------
# building a Trainer, refusing to overwrite, validating first


def test_building_a_trainer_on_an_existing_run_changes_nothing(tmp_path, shards):
    from lmstack.train.trainer import Trainer, pretrain

    cfg = tiny(tmp_path / "r", shards)
    pretrain(cfg)
    before = snapshot(tmp_path / "r")
    assert any(k.startswith("checkpoints/") for k in before) and "metrics.jsonl" in before
    for resume in (False, True):
        trainer = Trainer(cfg, resume=resume)
        trainer.close()
    assert snapshot(tmp_path / "r") == before                  # same files, bytes and modification times


def test_cli_refuses_an_existing_run_unless_fresh(tmp_path, shards, main, capsys):
    cfg = write_config(tmp_path / "t.json", tiny(tmp_path / "run", shards, steps=3))
    assert main(["train", str(cfg)]) == 0
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: run_dir: {tmp_path / 'run'} already holds a run (checkpoints); continue it with "
                   f"`lmstack train resume {tmp_path / 'run'}`, start over with --fresh, or set --run_dir\n")
    assert snapshot(tmp_path / "run") == before
    assert main(["train", str(cfg), "--fresh", "--steps", "2"]) == 0
    assert [s for s, _, _ in losses(tmp_path / "run")] == [1, 2]          # started over, not appended
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    assert main(["train", "resume", str(tmp_path / "run"), "--fresh"]) == 2


def test_a_failed_resume_leaves_the_run_resumable(tmp_path, shards, main, capsys):
    cfg = write_config(tmp_path / "t.json", tiny(tmp_path / "run", shards, steps=4))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    config_before = (run / "config.json").read_bytes()
    before = snapshot(run)
    bad = [(["--optim.lrr", "1"], "did you mean 'optim.lr'"),
           (["--optim.lr", "nan"], "optim.lr: must be a finite number, got nan"),
           (["--optim.lr", "inf"], "optim.lr: must be a finite number, got inf"),
           (["--optim.lr", "-1"], "optim.lr: must be positive, got -1"),
           (["--batch_size", "0"], "batch_size: must be >= 1, got 0"),
           (["--steps", "-3"], "steps: must be >= 1, got -3"),
           (["--data.seq_len", "0"], "data.seq_len: must be >= 2, got 0"),
           (["--threads", "0"], "threads: must be 'auto' or a positive integer, got 0"),
           (["--model.n_layer", "2"], "does not fit this run's model config")]
    for args, message in bad:
        capsys.readouterr()
        assert main(["train", "resume", str(run), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (args, err)
    assert snapshot(run) == before and (run / "config.json").read_bytes() == config_before
    assert main(["train", "resume", str(run), "--steps", "6"]) == 0
    assert [s for s, _, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    saved = read_json(run / "config.json")
    assert saved["steps"] == 6 and saved["_resolved"] == {"dtype": "fp32", "reason": "fp32 requested", "threads": 1}


# ---------------------------------------------------------------------------------------------------------
# resume after a hard kill: torn log, missing or corrupt checkpoint files


def test_resume_drops_a_torn_last_metrics_line(tmp_path, shards, main, capsys):
    from lmstack.train.trainer import pretrain

    cfg = tiny(tmp_path / "run", shards)
    pretrain(cfg, until=3)                                            # newest checkpoint: step 2
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.3')                             # a kill in the middle of a write
    assert main(["train", "resume", str(tmp_path / "run")]) == 0
    assert "dropping a torn last line" in capsys.readouterr().err
    assert [s for s, _, _ in losses(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["rng_missing", "optimizer_corrupt", "optimizer_foreign"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file_and_the_fix(tmp_path, shards, main, capsys,
                                                                               damage):
    from lmstack.train.trainer import pretrain

    run = tmp_path / "run"
    pretrain(tiny(run, shards, keep_last=2), until=5)                 # checkpoints step 2 and 4
    newest = run / "checkpoints" / "step_00000004"
    name = "rng.pt" if damage == "rng_missing" else "optimizer.pt"
    if damage == "rng_missing":
        (newest / name).unlink()
        what = "missing"
    elif damage == "optimizer_corrupt":
        (newest / name).write_bytes((newest / name).read_bytes()[:100])
        what = "corrupt ("
    else:
        torch.save({"something": "else"}, newest / name)
        what = "does not hold this run's optimizer state"
    capsys.readouterr()
    assert main(["train", "resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {newest / name}: {what}") and err.count("\n") == 1, err
    assert err.endswith(f"delete {newest} to resume from the previous checkpoint (step_00000002)\n")
    import shutil

    shutil.rmtree(newest)                                              # the fix the message names
    assert main(["train", "resume", str(run)]) == 0


# ---------------------------------------------------------------------------------------------------------
# signals: the checkpoint written on SIGINT / SIGTERM is exact


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_last_completed_step_exactly(tmp_path, shards, main, signum):
    """A real signal at a random point of a step, then `train resume`: the losses, gradient norms and final
    weights equal an uninterrupted run bit for bit. (Constant LR after warmup, so the resumed run may stop
    at a step count chosen after the interrupt without changing the schedule.)"""
    from lmstack.model import load
    from lmstack.train.trainer import pretrain

    kw = dict(steps=100_000, ckpt_every=0, optim=OptimConfig(lr=1e-2, warmup_steps=2, schedule="constant"))
    cfg = write_config(tmp_path / "t.json", tiny(tmp_path / "sig", shards, **kw))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "train", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    ckpts = list_checkpoints(tmp_path / "sig")
    assert len(ckpts) == 1, err
    stopped = read_json(ckpts[0] / "state.json")["step"]
    assert stopped >= 5 and f"stopped at step {stopped}" in err
    assert [s for s, _, _ in losses(tmp_path / "sig")] == list(range(1, stopped + 1))

    assert main(["train", "resume", str(tmp_path / "sig"), "--steps", str(stopped + 3)]) == 0
    pretrain(tiny(tmp_path / "ref", shards, **{**kw, "steps": stopped + 3}))
    assert losses(tmp_path / "sig") == losses(tmp_path / "ref")          # exact float equality
    a, b = load(tmp_path / "sig").state_dict(), load(tmp_path / "ref").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_handlers_are_installed_only_during_fit(tmp_path, shards):
    from lmstack.train.trainer import pretrain

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    pretrain(tiny(tmp_path / "r", shards, steps=2, threads=threads + 1))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert torch.get_num_threads() == threads


# ---------------------------------------------------------------------------------------------------------
# dtype record and MFU


def test_mfu_uses_the_peak_of_the_dtype_trained_in_and_never_exceeds_one(tmp_path, shards, monkeypatch, capsys):
    import lmstack.train.trainer as T

    asked = []

    def fake_peak(device, dtype=torch.float32, n=None, repeats=5):
        asked.append(dtype)
        return 1e3                                                   # far below what any step achieves

    monkeypatch.setattr(T, "measure_matmul_peak", fake_peak)
    summary = T.pretrain(tiny(tmp_path / "r", shards, steps=3, dtype="bf16", peak_tflops=0.0))
    assert asked == [torch.bfloat16]
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "mfu" in r]
    assert rows and all(0 < r["mfu"] <= 1.0 for r in rows)
    assert summary["peak_tflops"] * 1e12 > 1e3 and summary["dtype"] == "bf16"
    assert "above the measured peak" in capsys.readouterr().err
    resolved = read_json(tmp_path / "r" / "config.json")["_resolved"]
    assert resolved["dtype"] == "bf16" and resolved["threads"] == 1


def test_auto_dtype_resolves_through_the_one_rule(tmp_path, shards, monkeypatch):
    import lmstack.runtime as R
    import lmstack.train.trainer as T

    monkeypatch.setattr(R, "cpu_native_bf16", lambda: None)         # an AVX2-only CPU
    summary = T.pretrain(tiny(tmp_path / "r", shards, steps=2, dtype="auto"))
    assert (summary["dtype"], summary["dtype_reason"]) == ("fp32", "CPU without native bf16 (no AMX/AVX512-BF16 flag)")
    assert TrainConfig().dtype == "auto" and TrainConfig().threads == "auto"


def test_an_implausibly_low_fp32_peak_warns_about_busy_cores(tmp_path, shards, monkeypatch, capsys):
    import lmstack.train.trainer as T

    monkeypatch.setattr(T, "measure_matmul_peak", lambda device, dtype=torch.float32, n=None, repeats=5: 3e9)
    T.pretrain(tiny(tmp_path / "r", shards, steps=1, peak_tflops=0.0, threads=2))
    assert ("[train] warning: the matmul peak measured 3 GFLOP/s on 2 thread(s), under 5 GFLOP/s per thread"
            in capsys.readouterr().err)
