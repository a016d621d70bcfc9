"""``lmstack tokenizer train | encode | stats`` through the real entry point, including its errors."""

from __future__ import annotations

import json

import pytest

import lmstack.cli
from lmstack.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    # The tokenizer group is listed in lmstack.cli.LAYER_CLIS; make sure even before the lead adds it.
    if "lmstack.tokenizer.cli" not in lmstack.cli.LAYER_CLIS:
        monkeypatch.setattr(lmstack.cli, "LAYER_CLIS", ["lmstack.tokenizer.cli", *lmstack.cli.LAYER_CLIS])


def run(*argv: str) -> int:
    return lmstack.cli.main([str(a) for a in argv])


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The cat sat on the mat. " * 50 + "Dogs bark; cats purr.\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i}: the cat and the dog"})
                                             for i in range(40)), encoding="utf-8")
    return folder


def test_train_encode_stats(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run("tokenizer", "train", "--input", corpus / "a.txt", corpus / "b.jsonl", "--vocab-size", 300,
               "--out", out, "--tiktoken", "--workers", 1) == 0
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_vocab.txt", "tokenizer.tiktoken"}
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300
    capsys.readouterr()

    assert run("tokenizer", "encode", "--tokenizer", out, "--text", "the cat<|eos|>") == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("the cat<|eos|>") and tok.eos_id not in ids
    assert run("tokenizer", "encode", "--tokenizer", out, "--text", "the cat<|eos|>", "--allow-special") == 0
    assert [int(x) for x in capsys.readouterr().out.split()][-1] == tok.eos_id
    assert run("tokenizer", "encode", "--tokenizer", out, "--decode", *ids) == 0
    assert capsys.readouterr().out == "the cat<|eos|>\n"

    assert run("tokenizer", "stats", "--tokenizer", out / "tokenizer.json", "--input", corpus, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["round_trip"] == 1.0 and stats["vocab_size"] == 300
    assert stats["bytes_per_token"] == round(stats["bytes"] / stats["tokens"], 4) > 1.5
    assert run("tokenizer", "stats", "--tokenizer", out, "--input", corpus) == 0
    assert "bytes / token" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("empty", "the file is empty"), ("latin1", "not valid UTF-8"), ("missing", "no such file"),
    ("small", "too small"),
])
def test_train_errors_exit_2_with_one_line_and_write_nothing(corpus, tmp_path, capsys, case, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    inputs = {"empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt",
              "missing": tmp_path / "nope.txt", "small": corpus / "a.txt"}
    vocab = 100 if case == "small" else 300
    out = tmp_path / "out"
    assert run("tokenizer", "train", "--input", inputs[case], "--vocab-size", vocab, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_encode_with_corrupt_tokenizer_exits_2(tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab"', encoding="utf-8")
    assert run("tokenizer", "encode", "--tokenizer", tmp_path, "--text", "hi") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not valid JSON" in err and "\n" not in err


def test_help_has_examples(capsys):
    for cmd in ("train", "encode", "stats"):
        with pytest.raises(SystemExit) as e:
            run("tokenizer", cmd, "--help")
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out
