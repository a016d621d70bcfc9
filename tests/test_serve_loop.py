"""The production loop closed end to end on tiny random models: serve (A/B, sticky per user) -> log -> feedback
-> readout -> export -> DPO -> the new model served as the B arm."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from lmstack.model import build_model, preset, save
from lmstack.monitor.store import open_store
from lmstack.serve.loop import closed_loop
from lmstack.tokenizer import train_bpe

QUESTIONS = [{"prompt": f"What does function number {i} return?", "reference": f"It returns the value {i}."}
             for i in range(6)]


def _judge(answer: str, reference: str) -> float:
    """A deterministic stand-in for a person (the random models' answers all score 0 on ROUGE)."""
    return int(hashlib.sha256((answer + reference).encode()).hexdigest()[:8], 16) / 2 ** 32


def _model(folder, tok, seed):
    torch.manual_seed(seed)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=96)),
         folder)
    tok.save(folder)
    return folder


def test_serve_log_feedback_export_dpo_and_serve_the_new_model(tmp_path):
    tok = train_bpe([q["prompt"] + " " + q["reference"] for q in QUESTIONS] * 3, vocab_size=300, workers=1)
    a, b = _model(tmp_path / "sft", tok, 0), _model(tmp_path / "aligned", tok, 1)
    results, report = closed_loop(a, b, tmp_path / "loop", QUESTIONS, users=12, per_user=2, second_users=8,
                                  max_tokens=6, dpo_steps=3, judge_fn=_judge, seed=0)
    first = results["first"]
    assert first["srm"]["flagged"] is False and set(first["arms"]) == {"A", "B"}
    assert sum(v["n"] for v in first["arms"].values()) == 12 * 2          # every answer logged with its thumb
    assert results["pairs"] >= 2 and results["kto_rows"] == 12 * 2
    pairs = [json.loads(line) for line in (tmp_path / "loop" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs) and len(pairs) == results["pairs"]
    assert (tmp_path / "loop" / "dpo_round" / "model.safetensors").is_file()
    # the second round's B arm is the DPO round's model, logged under its label
    assert results["second_models"] == ["A:sft", "B:dpo_round"]
    with open_store(tmp_path / "loop" / "log.db", create=False) as store:
        rows = store.rows()
        assert len(rows) == 12 * 2 + 8 * 2 and {r.arm for r in rows} == {"A", "B"}
        by_user = {}
        for r in rows:
            by_user.setdefault(r.user, set()).add(r.arm)
        assert all(len(arms) == 1 for arms in by_user.values())             # sticky per user
        assert len(store.feedback()) == len(rows)
    assert "DPO pairs" in report and "| 2: SFT vs the new model |" in report
