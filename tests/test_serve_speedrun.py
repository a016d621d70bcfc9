"""The speedrun's serving stage on a tiny random chat model: the openai client checks pass, the load test has
no failed request and generates exactly the tokens asked for, the report and load.json are written."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from lmstack.model import build_model, preset, save
from lmstack.serve.speedrun import speedrun_serve
from lmstack.tokenizer import train_bpe


def test_speedrun_serve(tmp_path):
    tok = train_bpe(["the os module provides functions for the operating system.\n" * 4], vocab_size=300, workers=1)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=128))
    save(model, tmp_path / "chat_model")
    tok.save(tmp_path / "chat_model")
    results, report = speedrun_serve(tmp_path, clients=3, seconds=0.5, max_tokens=4)
    checks = results["checks"]
    assert checks["stream_equals_whole"] and checks["whole_equals_library"] and checks["usage_exact"]
    assert checks["metrics_running_after"]
    if checks["json_schema_valid"] is not None:
        assert checks["json_schema_valid"] is True
    for c in ("1", "3"):
        s = results["load"][c]
        assert s["requests"] > 0 and s["failed"] == 0 and s["output_tokens"] == 4 * s["requests"]
    assert "| 3 |" in report and "**no**" not in report
    assert json.loads((tmp_path / "serve" / "load.json").read_text())["checks"] == checks
