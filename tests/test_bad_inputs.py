"""A bad-input sweep across every command group: each case must end in exit code 2, exactly one ``error:`` line
on stderr, no traceback, and leave the workspace exactly as it was (no file changed, none half-written, no
empty folder left behind).

95 cases in all: ``CASES`` holds 89, run in-process through ``lmstack.cli.main`` (fast), over every command group
(tokenizer, data, model, generate/chat, train, finetune, eval, scaling, speedrun, and the CLI itself) and every
kind of bad input (missing, corrupt, truncated, empty, non-UTF-8, wrong type, out of range, unwritable output,
contradictory flags); then a read-only output folder (skipped as root), 4 cases in a real subprocess
(``SUBPROCESS_CASES``) and ``--json | head``. Every case passes (none is expected to fail).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.cli import main

ROOT = Path(__file__).resolve().parents[1]
H10A: list = []  # marks of the train config/resume/checkpoint cases (none: they pass)
H10B: list = []  # marks of the model-loading cases (none: they pass)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

CORPUS = ("the cat sat on the mat. the dog sat on the log. a bird flew over the tree.\n" * 20
          + "once upon a time there was a cat who liked the mat and the dog.\n" * 10)


def _build_template(root: Path) -> None:
    """The workspace every case starts from: a tokenizer, a tiny model, good and bad files of each kind."""
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    tok = train_bpe([CORPUS], vocab_size=300)
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=2,
                               max_seq_len=64))
    save(model, root / "model")
    tok.save(root / "model")
    # the same model with its weights cut short, and a Hugging Face-style folder without a tokenizer
    (root / "badmodel").mkdir()
    shutil.copy(root / "model" / "model_config.json", root / "badmodel")
    shutil.copy(root / "model" / "tokenizer.json", root / "badmodel")
    (root / "badmodel" / "model.safetensors").write_bytes((root / "model" / "model.safetensors").read_bytes()[:200])
    (root / "randmodel").mkdir()
    shutil.copy(root / "model" / "model_config.json", root / "randmodel")
    shutil.copy(root / "model" / "tokenizer.json", root / "randmodel")
    (root / "randmodel" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "notok").mkdir()
    shutil.copy(root / "model" / "model_config.json", root / "notok")
    shutil.copy(root / "model" / "model.safetensors", root / "notok")

    w = lambda name, text: (root / name).write_text(text, encoding="utf-8")  # noqa: E731
    w("good.txt", CORPUS)
    w("short.txt", "the cat\nthe dog\n")
    w("empty.txt", "")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    w("corrupt.json", '{"steps": 3, oops}')
    w("truncated.json", '{"model": {"vocab": {"a": 1')
    w("list.json", "[1, 2, 3]")
    w("bad.yaml", "steps: 3\nmodel:\n  n_layer: 2\n   d_model: [32\n")
    w("bad.toml", "steps = 3\n[model\nn_layer = 2\n")
    (root / "latin1.toml").write_bytes("run_dir = \"caf\xe9\"\n".encode("latin-1"))
    w("steps_str.toml", 'steps = "many"\n')
    w("lr_nan.toml", "steps = 2\n[optim]\nlr = nan\n[data]\ntrain = [\"good.txt\"]\n")
    w("speedrun_str.toml", '[tokenizer]\nvocab_size = "big"\n')
    w("data_missing.toml", 'out_dir = "dataout"\n[[sources]]\nname = "a"\npaths = ["missing.jsonl"]\n')
    w("data_str.toml", 'out_dir = "dataout"\nval_fraction = "lots"\n[[sources]]\nname = "a"\npaths = ["good.txt"]\n')
    w("data_outfile.toml", 'out_dir = "good.txt"\n[[sources]]\nname = "a"\npaths = ["good.txt"]\n')
    w("sweep_negative.toml", "tokens = [-100, 200, 400]\n[train.data]\ntrain = [\"good.txt\"]\n")
    w("sweep_budget.toml", "budgets = [-1e18]\n[train.data]\ntrain = [\"good.txt\"]\n")
    w("task_corrupt.yaml", "kind: perplexity\nformat: text\n  path: [x\n")
    w("task_nodata.yaml", "kind: perplexity\nformat: text\npath: nothing_here.txt\n")
    w("gen_corrupt.json", '{"max_new_tokens": }')
    row = {"params": 1000, "tokens": 5000, "loss": 3.0}
    w("identical.jsonl", "\n".join(json.dumps(row) for _ in range(6)) + "\n")
    w("fit_str.jsonl", "\n".join(json.dumps({**row, "params": "big"}) for _ in range(6)) + "\n")
    w("fit_corrupt.jsonl", '{"params": 1\n')
    w("empty.jsonl", "")
    w("ratings.jsonl", "\n".join(json.dumps({"prediction": "a", "reference": "b", "rating": "high"})
                                 for _ in range(4)) + "\n")
    (root / "userdir").mkdir()
    w("userdir/notes.md", "my own notes\n")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    _build_template(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: a file's sha256 and mode, a folder's mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel + "/"] = oct(p.stat().st_mode)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


@pytest.fixture
def workspace(template, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("LMSTACK_DATA", str(ws))
    return ws


def P(*argv: str, marks=(), id: str | None = None):  # noqa: A002
    return pytest.param(list(argv), marks=marks, id=id or " ".join(argv)[:80])


CASES = [
    # tokenizer
    P("tokenizer", "train", "--input", "missing.txt", "--vocab-size", "300", "--out", "tokout", id="tok-train-missing"),
    P("tokenizer", "train", "--input", "empty.txt", "--vocab-size", "300", "--out", "tokout", id="tok-train-empty"),
    P("tokenizer", "train", "--input", "latin1.txt", "--vocab-size", "300", "--out", "tokout", id="tok-train-latin1"),
    P("tokenizer", "train", "--input", "good.txt", "--vocab-size", "100", "--out", "tokout",
      id="tok-train-vocab-small"),
    P("tokenizer", "train", "--input", "good.txt", "--vocab-size", "abc", "--out", "tokout", id="tok-train-vocab-str"),
    P("tokenizer", "train", "--input", "good.txt", "--vocab-size", "300", "--out", "tokout", "--workers", "0",
      id="tok-train-workers-0"),
    P("tokenizer", "train", "--input", "good.txt", "--vocab-size", "300", "--out", "good.txt", id="tok-train-out-file"),
    P("tokenizer", "train", "--input", "good.txt", "--vocab-size", "300", "--out", "good.txt/sub",
      id="tok-train-out-under-file"),
    P("tokenizer", "encode", "--tokenizer", "corrupt.json", "--text", "hi", id="tok-encode-corrupt"),
    P("tokenizer", "encode", "--tokenizer", "truncated.json", "--text", "hi", id="tok-encode-truncated"),
    P("tokenizer", "encode", "--tokenizer", "latin1.txt", "--text", "hi", id="tok-encode-latin1"),
    P("tokenizer", "encode", "--tokenizer", "empty.txt", "--text", "hi", id="tok-encode-empty"),
    P("tokenizer", "encode", "--tokenizer", "list.json", "--text", "hi", id="tok-encode-wrong-type"),
    P("tokenizer", "encode", "--tokenizer", "tok", "--decode", "999999", id="tok-decode-out-of-range"),
    P("tokenizer", "encode", "--tokenizer", "tok", "--decode", "1", "--text", "hi", id="tok-decode-and-text"),
    P("tokenizer", "stats", "--tokenizer", "tok", "--input", "good.txt", "--top", "-1", id="tok-stats-top-negative"),
    P("tokenizer", "stats", "--tokenizer", "tok", "--input", "empty.txt", id="tok-stats-empty"),
    P("tokenizer", "stats", "--tokenizer", "tok", "--input", "latin1.txt", id="tok-stats-latin1"),
    # data
    P("data", "prepare", "corrupt.json", id="data-corrupt-json"),
    P("data", "prepare", "bad.yaml", id="data-bad-yaml"),
    P("data", "prepare", "bad.toml", id="data-bad-toml"),
    P("data", "prepare", "latin1.toml", id="data-latin1-config"),
    P("data", "prepare", "list.json", id="data-config-not-mapping"),
    P("data", "prepare", "data_missing.toml", id="data-missing-source"),
    P("data", "prepare", "data_str.toml", id="data-string-for-number"),
    P("data", "prepare", "data_outfile.toml", id="data-out-dir-is-file"),
    P("data", "prepare", "missing.toml", id="data-config-missing"),
    P("data", "prepare", "userdir", id="data-config-is-folder"),
    # model
    P("model", "info", "nope", id="model-info-unknown"),
    P("model", "info", "tiny", "--seq-len", "-5", id="model-info-seq-len-negative"),
    P("model", "info", "tiny", "--n_layer", "abc", id="model-info-string-for-number"),
    P("model", "info", "corrupt.json", id="model-info-corrupt"),
    P("model", "convert", "model", "model", id="convert-src-is-out"),
    P("model", "convert", "model", ".", id="convert-out-holds-src"),
    P("model", "convert", "model", "good.txt", id="convert-out-is-file"),
    P("model", "convert", "model", "good.txt", "--force", id="convert-out-is-file-force"),
    P("model", "convert", "model", "userdir", id="convert-out-not-model-folder"),
    P("model", "convert", "missing", "out", id="convert-src-missing"),
    P("model", "convert", "badmodel", "out", marks=H10B, id="convert-truncated-safetensors"),
    # generate / chat
    P("generate", "model", "--prompt", "hi", "--max_new_tokens", "-1", id="gen-max-new-negative"),
    P("generate", "model", "--prompt", "hi", "--max_new_tokens", "lots", id="gen-string-for-number"),
    P("generate", "missing", "--prompt", "hi", id="gen-missing-run"),
    P("generate", "model", "--prompt", "hi", "--config", "gen_corrupt.json", id="gen-corrupt-config"),
    P("generate", "model", "--prompt", "hi", "--config", "latin1.toml", id="gen-latin1-config"),
    P("generate", "model", "--prompt", "hi", "--draft", "missing", id="gen-missing-draft"),
    P("generate", "model", "--prompt", "hi", "--stream", "--json", id="gen-stream-and-json"),
    P("generate", "model", "--prompt", "a", "--prompt", "b", "--stream", id="gen-stream-two-prompts"),
    P("generate", "badmodel", "--prompt", "hi", marks=H10B, id="gen-truncated-safetensors"),
    P("generate", "randmodel", "--prompt", "hi", marks=H10B, id="gen-random-safetensors"),
    P("chat", "notok", id="chat-no-tokenizer"),
    P("chat", "missing", id="chat-missing-run"),
    # train
    P("train", "corrupt.json", id="train-corrupt-json"),
    P("train", "bad.yaml", id="train-bad-yaml"),
    P("train", "latin1.toml", id="train-latin1-config"),
    P("train", "steps_str.toml", id="train-string-for-number"),
    P("train", "lr_nan.toml", marks=H10A, id="train-lr-nan"),
    P("train", "resume", "missing_run", id="train-resume-missing"),
    P("train", str(ROOT / "configs" / "train_tiny.toml"), marks=H10A, id="train-before-speedrun"),
    # finetune
    P("finetune", "corrupt.json", id="finetune-corrupt-json"),
    P("finetune", str(ROOT / "configs" / "finetune_tiny.toml"), id="finetune-before-speedrun"),
    P("finetune", str(ROOT / "configs" / "finetune_tiny.toml"), "--base", "nope", id="finetune-base-missing"),
    # eval
    P("eval", "metrics", "--pred", "empty.txt", "--ref", "empty.txt", id="eval-metrics-empty"),
    P("eval", "metrics", "--pred", "good.txt", "--ref", "short.txt", id="eval-metrics-length-mismatch"),
    P("eval", "metrics", "--pred", "latin1.txt", "--ref", "latin1.txt", id="eval-metrics-latin1"),
    P("eval", "metrics", "--pred", "short.txt", "--ref", "short.txt", "--ci", "--resamples", "0",
      id="eval-metrics-resamples-0"),
    P("eval", "metrics", "--pred", "short.txt", "--ref", "short.txt", "--json", "good.txt/out.json",
      id="eval-metrics-json-under-file"),
    P("eval", "metrics", "--pred", "short.txt", "--ref", "short.txt", "--metrics", "nope", id="eval-metrics-unknown"),
    P("eval", "metrics", "--list", "--pred", "short.txt", id="eval-metrics-list-and-pred"),
    P("eval", "bench", "model", "--tasks", "nope", id="eval-bench-unknown-task"),
    P("eval", "bench", "model", "--tasks", "task_corrupt.yaml", id="eval-bench-corrupt-task"),
    P("eval", "bench", "model", "--tasks", "tinystories_ppl", "--limit", "-1", id="eval-bench-limit-negative"),
    P("eval", "bench", "model", "--tasks", "task_nodata.yaml", id="eval-bench-task-data-missing"),
    P("eval", "correlate", "empty.jsonl", "--human", "rating", "--scores", "x", id="eval-correlate-empty"),
    P("eval", "correlate", "ratings.jsonl", "--human", "rating", "--compute", "bleu",
      id="eval-correlate-string-rating"),
    # scaling
    P("scaling", "fit", "identical.jsonl", id="scaling-fit-identical-rows"),
    P("scaling", "fit", "empty.jsonl", id="scaling-fit-empty"),
    P("scaling", "fit", "fit_str.jsonl", id="scaling-fit-string-for-number"),
    P("scaling", "fit", "fit_corrupt.jsonl", id="scaling-fit-corrupt"),
    P("scaling", "fit", "identical.jsonl", "--budget", "-1", id="scaling-fit-budget-negative"),
    P("scaling", "sweep", "sweep_negative.toml", id="scaling-sweep-negative-tokens"),
    P("scaling", "sweep", "sweep_budget.toml", id="scaling-sweep-negative-budget"),
    P("scaling", "sweep", "--run_dir", "sw", id="scaling-sweep-no-data"),
    # speedrun
    P("speedrun", "corrupt.json", "--run-dir", "sr", id="speedrun-corrupt-json"),
    P("speedrun", "speedrun_str.toml", "--run-dir", "sr", id="speedrun-string-for-number"),
    P("speedrun", "--run-dir", "sr", "--stages", "nope", id="speedrun-unknown-stage"),
    P("speedrun", "--run-dir", "sr", "--stages", ",", id="speedrun-empty-stages"),
    P("speedrun", "--run-dir", "sr", "--stages", "corpus", "--inputs", "missing/*.txt", id="speedrun-missing-inputs"),
    P("speedrun", "--run-dir", "good.txt", "--stages", "corpus", id="speedrun-run-dir-is-file"),
    # the CLI itself
    P("nope", id="unknown-command"),
]


def _call(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, workspace, capsys):
    before = snapshot(workspace)
    code, err = _call(argv, capsys)
    assert "Traceback" not in err, err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert snapshot(workspace) == before


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_read_only_output_folder(workspace, capsys):
    ro = workspace / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        before = snapshot(workspace)
        code, err = _call(["tokenizer", "train", "--input", "good.txt", "--vocab-size", "300", "--out", "ro/tok"],
                          capsys)
        assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
        assert snapshot(workspace) == before
    finally:
        ro.chmod(0o755)


SUBPROCESS_CASES = [
    ["data", "prepare", "bad.yaml"],
    ["train", "latin1.toml"],
    ["model", "convert", "model", "model"],
    ["eval", "metrics", "--pred", "empty.txt", "--ref", "empty.txt"],
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.parametrize("argv", SUBPROCESS_CASES, ids=lambda a: "-".join(a[:2]))
def test_bad_input_in_a_real_process(argv, workspace):
    before = snapshot(workspace)
    out = subprocess.run([sys.executable, "-m", "lmstack.cli", *argv], cwd=workspace, capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")
    assert snapshot(workspace) == before


def test_json_output_into_a_closed_pipe_is_quiet(workspace):
    """`lmstack ... --json | head -c 1`: the reader goes away; no BrokenPipeError, no traceback."""
    out = subprocess.run(f"{sys.executable} -m lmstack.cli model info tiny --json | head -c 1", shell=True,
                         cwd=workspace, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stdout == "{"
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
