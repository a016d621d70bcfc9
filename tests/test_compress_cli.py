"""`lmstack compress quantize` / `report` through the real CLI entry point, on a tiny model with a tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main


@pytest.fixture()
def model_dir(tmp_path):
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat {i % 7} sat on the mat and looked at the dog" for i in range(400)))
    tok = train_bpe([text], 300)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=64, n_head=4, n_layer=2))
    save(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    return tmp_path


def test_quantize_then_report_then_generate(model_dir, capsys):
    m, text = model_dir / "m", model_dir / "text.txt"
    assert main(["compress", "quantize", str(m), "--method", "int8", "--out", str(model_dir / "q8")]) == 0
    assert main(["compress", "quantize", str(m), "--method", "gptq", "--group-size", "32", "--calib", str(text),
                 "--calib-seqs", "4", "--seq-len", "64", "--out", str(model_dir / "g4")]) == 0
    capsys.readouterr()
    assert main(["compress", "report", str(m), str(model_dir / "q8"), str(model_dir / "g4"), "--text", str(text),
                 "--seq-len", "64", "--chunks", "4", "--new-tokens", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[str(model_dir / "q8")]) == {"size_bytes", "ppl", "kld_mean", "top1_agree", "tokens_per_s"}
    assert rows[str(m)]["kld_mean"] == 0.0 and rows[str(m)]["top1_agree"] == 1.0
    assert 0 <= rows[str(model_dir / "q8")]["kld_mean"] < rows[str(model_dir / "g4")]["kld_mean"]  # random init: tiny
    assert rows[str(model_dir / "g4")]["size_bytes"] < rows[str(model_dir / "q8")]["size_bytes"] < rows[str(m)]["size_bytes"]
    assert main(["generate", str(model_dir / "g4"), "--prompt", "the cat", "--max-new-tokens", "5"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--method", "int4", "--group-size", "48"], "group_size=48 does not divide"),
    (["--method", "gptq"], "needs calibration text"),
    (["--method", "int8", "--calib", "x.txt"], "only gptq and awq use calibration data"),
])
def test_quantize_bad_input_is_one_line(model_dir, capsys, argv, message):
    assert main(["compress", "quantize", str(model_dir / "m"), "--out", str(model_dir / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (model_dir / "o").exists()
