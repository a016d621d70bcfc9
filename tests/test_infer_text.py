"""Text helpers, UTF-8-safe streaming, the CLI (generate, chat) and the report table."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from scripted import ScriptedModel

from lmstack.errors import LmstackError
from lmstack.infer import GenerationConfig, generate_text, stream_text
from lmstack.infer.report import sample_table, speculative_summary
from lmstack.infer.text import TextStream, chat_stream, load_run
from lmstack.model import build_model, preset, save
from lmstack.tokenizer import train_bpe

CORPUS = ["the cat sat on the mat. the dog sat on the log. café, naïve, 🙂 smiles.\n" * 3,
          "once upon a time there was a cat who liked the mat and the dog.\n"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64,
                           tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return m


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, tok):
    run = tmp_path_factory.mktemp("run")
    save(model, run)
    tok.save(run)
    return run


class Bytes:
    """Token i is the single byte i: streams can cut characters anywhere."""

    special_tokens: dict[str, int] = {}

    def token_bytes(self, i: int) -> bytes:
        return bytes([i])


def test_text_stream_never_splits_a_utf8_character():
    text = "héllo wörld 🙂 ok ✓"
    ts = TextStream(Bytes())
    deltas = [ts.push([b]) for b in text.encode()] + [ts.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[text.encode().index("🙂".encode()):][:3] == ["", "", ""]   # held until the 4th byte


def test_text_stream_cuts_at_stop_string_and_holds_back_a_possible_start():
    ts = TextStream(Bytes(), stop_strings=["END"])
    out = [ts.push(list(b"abc E")), ts.push(list(b"N")), ts.push(list(b"D more"))]
    assert out == ["abc ", "", ""] and ts.stopped
    ts = TextStream(Bytes(), stop_strings=["END"])
    assert ts.push(list(b"x EN")) == "x " and ts.push(list(b"Y")) == "ENY"        # a false start is released
    assert TextStream(Bytes()).push([0xC3]) == ""                                    # half a character waits


def test_generate_text_matches_ids_and_streaming(model, tok):
    cfg = GenerationConfig(max_new_tokens=20)
    text = generate_text(model, tok, "the cat", cfg)
    assert isinstance(text, str)
    assert "".join(stream_text(model, tok, "the cat", cfg)) == text
    both = generate_text(model, tok, ["the cat", "once upon a time there"], cfg)
    assert both[0] == text and len(both) == 2                  # batched (left-padded) == alone


def test_generate_text_stop_string_and_empty_prompt(model, tok):
    cfg = GenerationConfig(max_new_tokens=30)
    full = generate_text(model, tok, "the", cfg)
    stop = full[5:8]
    cut = generate_text(model, tok, "the", cfg.replace(stop_strings=[stop]))
    assert cut == full[:full.find(stop)]
    assert "".join(stream_text(model, tok, "the", cfg.replace(stop_strings=[stop]))) == cut
    assert isinstance(generate_text(model, tok, "", cfg), str)    # starts from BOS


def test_chat_stream_stops_at_end_of_turn(model, tok):
    """The scripted reply is "the cat", then <|end|>, then more text: the stream must end at <|end|>."""
    words = tok.encode("the cat")
    after = tok.encode(" sat on the mat")
    scripted = ScriptedModel(model, words + [tok.special_tokens["<|end|>"]] + after)
    cfg = GenerationConfig(max_new_tokens=12)
    reply = "".join(chat_stream(scripted, tok, [{"role": "user", "content": "hi"}], cfg))
    assert reply == "the cat"                   # nothing after <|end|>, and the marker itself is not printed
    assert scripted.calls == len(words) + 1     # generation stopped at <|end|>, not at max_new_tokens


def test_load_run_and_errors(run_dir, tmp_path):
    model, tok = load_run(run_dir)
    assert model.config.vocab_size == tok.vocab_size
    with pytest.raises(LmstackError, match="no such model folder or run directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(LmstackError, match="no model"):
        load_run(tmp_path)


def test_cli_generate(run_dir, capsys, model, tok):
    from lmstack.cli import LAYER_CLIS, main

    if "lmstack.infer.cli" not in LAYER_CLIS:
        LAYER_CLIS.append("lmstack.infer.cli")
    assert main(["generate", str(run_dir), "--prompt", "the cat", "--prompt", "the dog", "--max_new_tokens", "8",
                 "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["the cat", "the dog"]
    assert lines[0]["completion"] == generate_text(model, tok, "the cat", GenerationConfig(max_new_tokens=8))
    assert main(["generate", str(run_dir), "--prompt", "the", "--stream", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["generate", str(run_dir), "--prompt", "x", "--top_p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_chat_reads_turns_from_stdin(run_dir, capsys, monkeypatch):
    from lmstack.cli import LAYER_CLIS, main

    if "lmstack.infer.cli" not in LAYER_CLIS:
        LAYER_CLIS.append("lmstack.infer.cli")
    import lmstack.infer.text as text

    seen = []
    real = text.chat_stream

    def spy(model, tok, messages, cfg, **kw):
        seen.append([dict(m) for m in messages])
        return real(model, tok, messages, cfg, **kw)

    monkeypatch.setattr(text, "chat_stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n/exit\nignored\n"))
    assert main(["chat", str(run_dir), "--max_new_tokens", "6", "--system", "be brief"]) == 0
    system = {"role": "system", "content": "be brief"}
    assert seen == [[system, {"role": "user", "content": "hello"}], [system, {"role": "user", "content": "again"}]]
    assert capsys.readouterr().out.endswith("\n")


def test_sample_table_and_speculative_summary(model, tok):
    md = sample_table(model, tok, ["the cat"], max_new_tokens=8)
    for name in ("greedy", "top-k", "top-p", "beam"):
        assert f"| {name}" in md
    assert "the cat" in md
    summary = speculative_summary(model, tok, ["the cat sat on the mat. the cat"], max_new_tokens=8, repeats=1)
    assert "prompt lookup" in summary and "acceptance" in summary


def test_suppress_tokens_are_never_generated_and_chat_config_bans_role_markers(model, tok):
    from lmstack.infer import generate
    from lmstack.infer.text import chat_config

    prompt = torch.tensor([tok.encode("the cat")])
    free = generate(model, prompt, GenerationConfig(max_new_tokens=10))[0, prompt.shape[1]:]
    banned = sorted(set(free.tolist()))
    out = generate(model, prompt, GenerationConfig(max_new_tokens=10, suppress_tokens=banned))[0, prompt.shape[1]:]
    assert not set(out.tolist()) & set(banned)
    cfg = chat_config(tok)
    end = tok.special_tokens["<|end|>"]
    assert cfg.eos_token_id == [end]
    assert set(cfg.suppress_tokens) == set(tok.special_tokens.values()) - {end}


def test_load_run_finds_a_speedrun_model_and_names_adapter_runs(run_dir, tmp_path):
    import shutil

    speedrun = tmp_path / "speedrun"
    (speedrun / "stages").mkdir(parents=True)
    (speedrun / "config.json").write_text('{"run_dir": "x"}')      # a job config, not a model config
    shutil.copytree(run_dir, speedrun / "pretrain")
    shutil.copytree(run_dir, speedrun / "chat_model")
    model, _ = load_run(speedrun)
    assert model.config.n_layer == 2
    from lmstack.infer.text import find_model_folder

    assert find_model_folder(speedrun).name == "pretrain"
    assert find_model_folder(speedrun, prefer=("chat_model", "pretrain")).name == "chat_model"
    adapter_run = tmp_path / "sft"
    adapter_run.mkdir()
    (adapter_run / "config.json").write_text('{"method": "lora"}')
    (adapter_run / "adapter_config.json").write_text('{"base": "nope"}')
    with pytest.raises(LmstackError, match="the adapter's base model 'nope' does not exist"):
        load_run(adapter_run)
