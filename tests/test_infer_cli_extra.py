"""HF export with tokenizer_config/generation_config (transformers stops at EOS), chat sessions that survive an
over-long message and Ctrl-C, and finetune --base errors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmstack.model import build_model, preset, save
from lmstack.tokenizer import train_bpe

CORPUS = ["the cat sat on the mat. the dog ran in the park. " * 20]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64))
    run = tmp_path_factory.mktemp("run")
    save(model, run)
    tok.save(run)
    return run


def cli(*argv: str) -> int:
    from lmstack.cli import LAYER_CLIS, main

    for mod in ("lmstack.infer.cli", "lmstack.model.cli", "lmstack.finetune.cli"):
        if mod not in LAYER_CLIS:
            LAYER_CLIS.append(mod)
    return main(list(argv))


def test_hf_export_has_eos_and_hf_generate_stops(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmstack.infer.text import load_run
    from lmstack.model import hf

    model, tok = load_run(run_dir)
    out = tmp_path / "hf"
    hf.save(model, out, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.eos_token == "<|eos|>"
    assert hf_tok("the cat")["input_ids"] == tok.encode("the cat")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # Make EOS the argmax everywhere: HF generate must stop after one token (it would run 20 without EOS).
    head = torch.nn.Linear(ref.config.hidden_size, ref.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_id] = 1.0
    ref.lm_head = head
    x = torch.tensor([tok.encode("the cat")])
    y = ref.generate(x, max_new_tokens=20, do_sample=False)   # no eos_token_id given: from generation_config
    assert y[0, x.shape[1]].item() == tok.eos_id and y.shape[1] == x.shape[1] + 1


def test_chat_survives_long_message_and_keeps_history(run_dir, monkeypatch, capsys):
    long = "the cat sat on the mat " * 40
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the cat\n{long}\nthe dog\n"))
    assert cli("chat", str(run_dir), "--max_new_tokens", "8") == 0
    captured = capsys.readouterr()
    assert "does not fit the model's context" in captured.err
    assert len([l for l in captured.out.splitlines()]) == 2   # two replies: before and after the long one


def test_chat_ctrl_c_stops_the_reply_not_the_session(run_dir, monkeypatch, capsys):
    from lmstack.infer import text

    real = text.chat_stream
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            yield "partial"
            raise KeyboardInterrupt
        yield from real(*a, **k)

    monkeypatch.setattr(text, "chat_stream", interrupted)
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nthe dog\n"))
    assert cli("chat", str(run_dir), "--max_new_tokens", "4") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "partial [stopped]" and len(out) == 2 and len(calls) == 2


def test_chat_second_ctrl_c_at_prompt_quits(run_dir, monkeypatch, capsys):
    answers = iter([KeyboardInterrupt, "the cat", KeyboardInterrupt, KeyboardInterrupt, "never"])

    def fake_input(prompt=""):
        a = next(answers)
        if a is KeyboardInterrupt:
            raise KeyboardInterrupt
        return a

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli("chat", str(run_dir), "--max_new_tokens", "4") == 0
    assert next(answers) == "never"   # quit after the second Ctrl-C in a row, before reading "never"
    assert "Ctrl-C again" in capsys.readouterr().err


def test_finetune_base_that_does_not_exist(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_tiny.toml"
    assert cli("finetune", str(config), "--base", str(tmp_path / "nope"), "--run_dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no tokenizer.json" not in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
