"""The serving scheduler: greedy output alone equals output in a busy batch and equals complete(); a
cancelled request frees its slot; a full queue raises QueueFull."""

from __future__ import annotations

import pytest
import torch

from lmstack.infer import GenerationConfig
from lmstack.infer.text import complete, prepare_prompts
from lmstack.model import build_model, preset
from lmstack.serve.engine import Engine, QueueFull
from lmstack.tokenizer import train_bpe

CORPUS = ["the cat sat on the mat. the dog sat on the log. once upon a time there was a cat.\n" * 4]
PROMPTS = ["the cat", "once upon a time", "the dog sat on", "a", "mat. the log"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64,
                           tie_embeddings=False)).eval()
    with torch.no_grad():   # sharper logits: greedy text that varies with the prompt
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return m


def _ids(model, tok, prompt, n=12):
    [ids], _, cfg = prepare_prompts(model, tok, [prompt], GenerationConfig(max_new_tokens=n))
    return ids, cfg


def test_greedy_alone_equals_busy_batch_and_complete(model, tok):
    engine = Engine(model, tok, max_batch=8, max_queue=16).start()
    try:
        ids, cfg = _ids(model, tok, PROMPTS[0])
        alone = [t for t, _ in engine.submit(ids, cfg).tokens()]
    finally:
        engine.stop()
    busy_engine = Engine(model, tok, max_batch=8, max_queue=16)
    # queued before the thread starts: all five are admitted before the first step and share every forward
    reqs = [busy_engine.submit(*_ids(model, tok, p, 12 + 3 * i)) for i, p in enumerate(PROMPTS)]
    busy_engine.start()
    try:
        busy = [[t for t, _ in r.tokens()] for r in reqs]
    finally:
        busy_engine.stop()
    ref = complete(model, tok, PROMPTS[0], GenerationConfig(max_new_tokens=12))
    assert alone == busy[0] == ref.token_ids
    assert reqs[0].finish_reason == ref.finish_reason
    for p, r, got in zip(PROMPTS[1:], reqs[1:], busy[1:]):   # every neighbour equals its own lone run too
        assert got == complete(model, tok, p, r.config).token_ids
    assert busy_engine.metrics.running == 0 and busy_engine.metrics.tokens_total == sum(map(len, busy))


def test_cancel_frees_the_slot(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=4).start()
    try:
        ids, cfg = _ids(model, tok, PROMPTS[1], 40)
        first = engine.submit(ids, cfg.replace(eos_token_id=[0]))   # runs long: id 0 is never chosen here
        it = first.tokens()
        next(it)
        first.cancel()
        rest = list(it)                       # the stream ends without finishing
        assert first.finish_reason is None and len(rest) < 39
        second = engine.submit(*_ids(model, tok, PROMPTS[2], 5))   # the one slot is free again
        assert [t for t, _ in second.tokens()] == complete(model, tok, PROMPTS[2], second.config).token_ids
        assert engine.batch.free_slots == 1 and engine.metrics.running == 0
    finally:
        engine.stop()


def test_full_queue_raises(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=2)   # not started: nothing leaves the queue
    ids, cfg = _ids(model, tok, PROMPTS[0])
    engine.submit(ids, cfg)
    engine.submit(ids, cfg)
    with pytest.raises(QueueFull, match=r"the request queue is full \(2 waiting\); retry later"):
        engine.submit(ids, cfg)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, tok, monkeypatch, capsys):
    engine = Engine(model, tok, max_batch=2, max_queue=4).start()
    try:
        def broken():
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.batch, "step", broken)
        ids, cfg = _ids(model, tok, PROMPTS[0], 4)
        with pytest.raises(RuntimeError, match="boom"):
            list(engine.submit(ids, cfg).tokens())
        assert "RuntimeError: boom" in capsys.readouterr().err     # a bug keeps its traceback
        assert [t for t, _ in engine.submit(ids, cfg).tokens()] == complete(model, tok, PROMPTS[0], cfg).token_ids
    finally:
        engine.stop()


def test_run_many_steps_two_engines_in_one_thread(model, tok):
    """The A/B arms' engines in one thread (as lmstack serve runs them in its main thread): both answer as
    complete() does; stopping one ends the loop and releases the other's callers."""
    import threading

    from lmstack.errors import LmstackError as Err

    cond = threading.Condition()
    a, b = Engine(model, tok, max_batch=2, cond=cond), Engine(model, tok, max_batch=2, cond=cond)
    loop = threading.Thread(target=Engine.run_many, args=([a, b],), daemon=True)
    loop.start()
    ids, cfg = _ids(model, tok, "the cat", 6)
    want = complete(model, tok, "the cat", GenerationConfig(max_new_tokens=6)).token_ids
    ra, rb = a.submit(ids, cfg), b.submit(ids, cfg)
    assert [t for t, _ in ra.tokens()] == want and [t for t, _ in rb.tokens()] == want
    b.max_queue = 0                      # nothing more for b; a request left waiting on a is released at the stop
    late = a.submit(ids, cfg.replace(max_new_tokens=40))
    a.stop()
    loop.join(timeout=30)
    assert not loop.is_alive()
    try:
        list(late.tokens())
    except Err:
        pass
    with pytest.raises(Err, match="share one condition"):
        Engine.run_many([Engine(model, tok), Engine(model, tok)])


def test_metrics_keep_only_the_last_window_of_steps():
    from lmstack.serve.engine import Metrics

    m = Metrics()
    for i in range(1000):                      # 1000 steps 0.1 s apart: only the last 10 s stay
        m.record_step(1000.0 + 0.1 * i, 2)
    assert len(m.recent) <= 102 and m.recent[-1] == (1000.0 + 99.9, 2)
