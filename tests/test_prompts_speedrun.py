"""The speedrun's prompts stage on a tiny random model: registry, export, suite, comparison, report."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.model import build_model, preset
from lmstack.prompts.registry import open_registry
from lmstack.prompts.speedrun import speedrun_prompts
from lmstack.prompts.suite import load_suite
from lmstack.tokenizer import train_bpe

ROWS = [{"instruction": f"What does `mod.f{i}()` do?", "output": f"Return the value number {i} of the thing.",
         "source": f"docstring:mod.f{i}()"} for i in range(5)]


@pytest.fixture(scope="module")
def model_and_tok():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a 32-wide model: threads only contend
    tok = train_bpe([r["instruction"] + " " + r["output"] for r in ROWS] * 3, vocab_size=300, workers=1)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=96,
                               tie_embeddings=False)).eval()
    yield model, tok
    torch.set_num_threads(threads)


def test_speedrun_prompts(model_and_tok, tmp_path):
    model, tok = model_and_tok
    s = speedrun_prompts(model, tok, tmp_path, cases=3, repeats=2, max_new_tokens=4, rows=ROWS)
    assert s["versions"] == ["doc-qa@1", "doc-qa@2"] and s["labels"] == {"production": 1, "staging": 2}
    assert s["cases"] == 3 and s["baseline"]["n"] == 6 and s["candidate"]["n"] == 6
    assert 0 <= s["baseline"]["ci"][0] <= s["baseline"]["pass_rate"] <= s["baseline"]["ci"][1] <= 1
    assert s["report"].startswith("## Prompts\n") and (tmp_path / "report.md").read_text() == s["report"]
    results = json.loads((tmp_path / "suite_results.json").read_text())
    assert [len(c["runs"]) for c in results["candidate"]["cases"]] == [2] * 3
    # the exported registry and the written suite are the ones `lmstack prompt test` reads back
    fresh = open_registry(tmp_path / "copy.sqlite")
    assert fresh.import_files([tmp_path / "registry"]) == {"doc-qa": (2, 2)}
    assert len(load_suite(tmp_path / "suite.yaml").cases) == 3
    again = speedrun_prompts(model, tok, tmp_path, cases=3, repeats=2, max_new_tokens=4, rows=ROWS)
    assert again["baseline"] == s["baseline"] and again["candidate"] == s["candidate"]   # seeded: a rerun is equal


def test_speedrun_json_every_constrained_reply_validates(model_and_tok, tmp_path):
    pytest.importorskip("llguidance")
    from lmstack.infer.structured import is_valid_json
    from lmstack.prompts.speedrun import DOC_CARD_SCHEMA, speedrun_json

    _, tok = model_and_tok
    torch.manual_seed(1)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=256,
                               tie_embeddings=False)).eval()
    # a random model writes the longest strings the schema allows: its bounds fit the stage's 160 new tokens
    s = speedrun_json(model, tok, tmp_path, n=4, rows=ROWS)
    assert s["constrained"]["valid"] == 4 and s["constrained"]["cut_at_length"] == 0
    assert s["unconstrained"]["valid"] == 0        # the random model never writes this JSON by itself
    rows = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert all(is_valid_json(r["constrained"], DOC_CARD_SCHEMA) for r in rows)
    assert "| `json_schema` constrained | 4/4 | 0 |" in s["report"]


def test_speedrun_redteam_report(model_and_tok, tmp_path):
    from lmstack.prompts.redteam import CATEGORIES, speedrun_redteam

    model, tok = model_and_tok
    r = speedrun_redteam(model, tok, tmp_path / "rt", per_category=2, max_new_tokens=4, link_prefix="x/")
    assert r["attacks"] == 2 * len(CATEGORIES) and set(r["asr"]) == set(CATEGORIES)
    assert "![attack success rate per category](x/asr.png)" in r["report"]
    assert (tmp_path / "rt" / "report.json").is_file() and (tmp_path / "rt" / "report.md").is_file()
