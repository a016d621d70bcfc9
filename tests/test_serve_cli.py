"""``lmstack serve``: bad input at start-up is one line and exit code 2 (a folder that is not a model, a port in
use); a saved model answers the openai client through the real command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmstack.cli import main
from lmstack.model import build_model, preset, save
from lmstack.tokenizer import train_bpe

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_not_a_model_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["serve", str(tmp_path), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}: no model found")


def test_port_in_use_is_one_line_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --host 127.0.0.1 --port {port}: the address is already in use; pick another --port\n"


def test_binding_beyond_loopback_needs_an_api_key(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    assert capsys.readouterr().err == ("error: --host 0.0.0.0: binding beyond loopback needs --api-key KEY (clients "
                                       "send it as the bearer token)\n")


def test_serve_command_answers_the_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    tok = train_bpe(["the cat sat on the mat. once upon a time there was a cat.\n" * 4], vocab_size=280)
    torch.manual_seed(0)
    run = tmp_path / "tiny"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64)),
         run)
    tok.save(run)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", str(run), "--port", str(port),
                             "--device", "cpu", "--api-key", "sekrit", "--log-store", str(tmp_path / "log.db"),
                             "--candidate", str(run), "--experiment", "same-model"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekrit", max_retries=0)
        while True:   # bounded by the test timeout
            assert proc.poll() is None, proc.stderr.read()
            try:
                models = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert models == ["tiny"]
        r = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert r.usage.prompt_tokens == len(tok.encode("the cat")) and r.usage.completion_tokens <= 5
        texts = {client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0,
                                           user=f"u{i}").choices[0].text for i in range(8)}
        assert texts == {r.choices[0].text}          # both arms serve the same weights: the same greedy text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from lmstack.monitor.store import open_store

    with open_store(tmp_path / "log.db", create=False) as store:   # --log-store kept the interaction
        row = store.get(r.id)
        assert row.input == "the cat" and row.output == r.choices[0].text and row.model in ("tiny", "tiny")
        assert {x.arm for x in store.rows()} == {"A", "B"}   # 8 users, sticky arms, both engines in the main thread


def test_a_chat_template_that_fails_to_render_is_one_line_exit_2(tmp_path, capsys):
    import json

    tok = train_bpe(["the cat sat on the mat.\n" * 4], vocab_size=270)
    run = tmp_path / "broken"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64)), run)
    tok.save(run)
    (run / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"}))
    assert main(["serve", str(run), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "chat template" in err and "fix chat_template" in err


def test_bad_embedder_and_timeout_are_one_line_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", str(_free_port()), "--request-timeout", "0"]) == 2
    assert capsys.readouterr().err == "error: --request-timeout: must be > 0 seconds, got 0.0\n"
    assert main(["serve", str(tmp_path), "--port", str(_free_port()), "--log-store", "mysql://x/y"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scheme 'mysql'" in err
