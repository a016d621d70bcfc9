"""The package outside this checkout: a built wheel, installed (not editable) into a fresh virtualenv, runs
``lmstack --help``, a built-in eval task and the speedrun's first stages; and ``lmstack --help`` does not
import torch (start-up time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, lmstack.cli; lmstack.cli.build_parser(); "
            "print([m for m in ('torch', 'transformers', 'matplotlib', 'safetensors') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[]"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv with the wheel installed; dependencies come from this interpreter's site-packages through
    a .pth file (offline and fast), which does not make this checkout's lmstack importable."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"  # build from a copy, so setuptools' build/ and egg-info never land in the checkout
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    shutil.copy(ROOT / "README.md", tree)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(tree)], check=True, capture_output=True, env=_clean_env())
    wheel = next((tmp / "dist").glob("lmstack-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmstack/eval/tasks/hellaswag.yaml" in names and "lmstack/eval/tasks/humaneval.yaml" in names
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = sysconfig.get_paths()["purelib"]
    (site / "_lmstack_test_deps.pth").write_text(deps + "\n")  # a plain path: the editable .pth there is inert
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, env=_clean_env())
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "lmstack"), *args], cwd=cwd, capture_output=True, text=True,
                          env=_clean_env(), timeout=300)


def test_wheel_install_runs_help_an_eval_task_and_the_first_speedrun_stages(installed, tmp_path):
    py = installed / "bin" / "python"
    where = subprocess.run([str(py), "-c", "import lmstack; print(lmstack.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    assert where.startswith(str(installed)), where  # the installed copy, not this checkout
    out = _run(installed, "--help", cwd=tmp_path)
    assert out.returncode == 0 and "speedrun" in out.stdout

    # the speedrun's first stages on a tiny corpus
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"Story {i}: a cat and a dog walked to the park and played with a red ball."} for i in range(40)]
    (data / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = _run(installed, "speedrun", "--run-dir", "run", "--stages", "corpus,tokenizer", "--inputs", str(data),
               "--tokenizer.vocab_size", "300", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "tokenizer.json").is_file()

    # a built-in task by name (package data), on a tiny model saved next to that tokenizer
    make_model = ("import torch; from lmstack.model import build_model, preset, save; "
                  "from lmstack.tokenizer import load_tokenizer; torch.manual_seed(0); "
                  "tok = load_tokenizer('run/tokenizer.json'); "
                  "save(build_model(preset('tiny', vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, "
                  "n_kv_head=2, max_seq_len=64)), 'run/model'); tok.save('run/model')")
    subprocess.run([str(py), "-c", make_model], cwd=tmp_path, check=True, capture_output=True, env=_clean_env())
    text = tmp_path / "evaldata" / "text" / "tinystories"
    text.mkdir(parents=True)
    (text / "tinystories_valid_sample.txt").write_text("A cat sat.\n\nThe dog ran to the park.\n", encoding="utf-8")
    out = _run(installed, "eval", "bench", "run/model", "--tasks", "tinystories_ppl", "--data-dir", "evaldata",
               "--json", "bench.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench.json").read_text())["tasks"][0]
    assert result["name"] == "tinystories_ppl" and result["n"] == 2 and result["metrics"]["perplexity"] > 1
