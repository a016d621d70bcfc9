"""The chat page, end to end in headless Chromium (Debian's ``chromium``, driven by Playwright): type a message,
watch the reply stream in, stop it, send another and give it a thumbs up; the server's log holds the thumb.

Skips with a message where Playwright or ``/usr/bin/chromium`` is missing (``.ci/run`` installs chromium).
``LMSTACK_SCREENSHOT=path.png`` saves the final page there (the README's screenshot); ``LMSTACK_PAGE_MODEL=DIR``
serves a real model folder instead of the random test model.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
                allow_module_level=True)

from lmstack.model import build_model, preset
from lmstack.serve.app import create_app
from lmstack.tokenizer import train_bpe

# as the workplace's browser checks start it: no sandbox as root, and no background traffic on a closed network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    real = os.environ.get("LMSTACK_PAGE_MODEL")
    if real:
        from lmstack.infer.text import load_run

        model, tok = load_run(real, prefer=("chat_model", "pretrain"))
        name = Path(real).name
    else:
        tok = train_bpe(["the cat sat on the mat. the dog sat on the log. once upon a time there was a cat.\n" * 4],
                        vocab_size=300)
        torch.manual_seed(0)
        model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4,
                                   max_seq_len=512)).eval()
        name = "tiny-page"
    app = create_app(model, tok, name, max_batch=2, max_queue=4)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join()


def test_type_stream_stop_and_thumbs_up_in_chromium(served, monkeypatch):
    base, app = served
    engine = app.state.server.engine
    real_step = engine.batch.step

    def paced_step():   # a reply slow enough to watch it grow and to stop it
        time.sleep(0.03)
        return real_step()

    monkeypatch.setattr(engine.batch, "step", paced_step)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(base + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.locator("#status").inner_text() == "ready"

            # 1. type, stream, stop
            page.fill("#max_tokens", "200")
            page.fill("#prompt", "Tell me a long story about a cat.")
            page.press("#prompt", "Enter")
            reply = page.locator(".msg.assistant .body").first
            lengths = set()
            deadline = time.time() + 30
            while len(lengths) < 3 and time.time() < deadline:   # the text grows chunk by chunk
                lengths.add(len(reply.inner_text()))
                time.sleep(0.05)
            assert len(lengths - {0}) >= 2, f"the reply did not stream: {lengths}"
            assert page.locator("#stop").is_enabled()
            page.click("#stop")
            page.wait_for_function("document.querySelector('#status').textContent === 'stopped'")
            assert page.locator(".msg.assistant").first.get_attribute("data-finish") == "stopped"
            while engine.metrics.running:     # the stopped request gave its slot back (bounded by the timeout)
                time.sleep(0.02)
            assert engine.batch.free_slots == engine.batch.slots

            # 2. a reply that finishes, then a thumbs up
            page.fill("#max_tokens", "12")
            page.fill("#prompt", "Once upon a time")
            page.press("#prompt", "Enter")
            second = page.locator(".msg.assistant").nth(1)
            second.locator("button[title='thumbs up']").wait_for(timeout=30_000)
            finish = second.get_attribute("data-finish")
            assert finish in ("stop", "length")
            second.locator("button[title='thumbs up']").click()
            page.wait_for_function("document.querySelector('#status').textContent === 'feedback saved'")
            assert "chosen" in second.locator("button[title='thumbs up']").get_attribute("class")
            shot = os.environ.get("LMSTACK_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)
        finally:
            browser.close()
    thumbs = [f for f in app.state.server.log.feedback() if f.kind == "thumb"]
    assert [f.value for f in thumbs] == [1]
