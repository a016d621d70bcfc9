"""The OpenAI-compatible HTTP front of :class:`lmstack.serve.engine.Engine` (FastAPI; SSE for streaming).

    app = create_app(model, tokenizer, "stories", max_batch=8, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``/health``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream`` with
``stream_options.include_usage``; ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
``presence_penalty``, ``frequency_penalty``, ``response_format`` text / json_object / json_schema) and ``/metrics`` (Prometheus text). Prompts and chat
conversations go through :func:`lmstack.infer.text._prepare`, the rule the CLI's ``generate`` and ``chat``
follow (the folder's chat template, the EOS / end-of-turn stops), and text through its
:class:`~lmstack.infer.text.TextStream`; so a request at temperature 0 answers what ``complete`` answers.
Errors carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad parameter,
malformed JSON or a prompt too long for the context, 404 for another model's name, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from torch import nn

from lmstack.errors import LmstackError
from lmstack.extras import require

require("fastapi", "lmstack serve")
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lmstack.infer.config import GenerationConfig
from lmstack.infer.text import TextStream, _prepare, _skip_ids
from lmstack.serve.engine import Engine, QueueFull, Request

# Request fields this server does not implement yet: a value other than these defaults is refused (400)
# rather than silently ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "function_call": (None, "none")}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param, "invalid_parameter")


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {v!r}")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _int(body: Mapping[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(name, f"must be an integer >= {lo}, got {v!r}")
    return v


def _stops(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 4:
        raise _bad("stop", f"must be a non-empty string or a list of at most 4, got {v!r}")
    return items


def _json_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a ``response_format`` asks for (None: free text); decoded by the constrained decoder."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format", "json_schema needs {\"name\": ..., \"schema\": {...}}")
        return schema
    raise _bad("response_format", f"type must be text, json_object or json_schema, got {kind!r}")


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}]", "needs a role of system, user or assistant")
        c = m.get("content")
        if isinstance(c, list):   # content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise _bad(f"messages[{i}].content", f"must be a string, got {type(c).__name__}")
        out.append({"role": m["role"], "content": c})
    return out


def _prompt(body: Mapping[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        return p
    raise _bad("prompt", "must be a string, one string in a list, or a list of token ids (batches of prompts "
                         "are not supported yet: send one request each)")


class Server:
    """The state behind the routes: the model, its engine, and the request rules."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, max_batch: int, max_queue: int):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        self.ctx = int(model.config.max_seq_len)
        self.created = int(time.time())

    def parse(self, body: Mapping[str, Any], chat: bool) -> tuple[list[int], GenerationConfig, int, bool, bool]:
        """(prompt ids, config, n, stream, include_usage) of a request body, or an :class:`ApiError`."""
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model", "required: the model's name (GET /v1/models lists it)")
        if model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        for name, defaults in UNSUPPORTED.items():
            if name in body and body[name] not in defaults:
                raise ApiError(400, f"{name}: not supported by this server yet", name, "unsupported_parameter")
        max_tokens = _int(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens", 0)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
        frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _bad("seed", f"must be an integer, got {seed!r}")
        n = _int(body, "n", 1) or 1
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise _bad("stream", f"must be a boolean, got {stream!r}")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _bad("stream_options", "must be an object")
        if stream and n > 1:
            raise ApiError(400, "n: more than one choice is not supported with stream=true yet", "n",
                           "unsupported_parameter")
        prompt: Any = _messages(body) if chat else _prompt(body)
        # the default (no max_tokens) is OpenAI's 16 for completions and the rest of the context for chat
        first = GenerationConfig(max_new_tokens=max_tokens if max_tokens is not None else (0 if chat else 16),
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                 top_p=top_p, seed=seed, stop_strings=_stops(body), presence_penalty=presence,
                                 frequency_penalty=frequency, json_schema=_json_schema(body))
        try:
            [ids], [dropped], cfg = _prepare(self.model, self.tokenizer, [prompt], first, chat=chat)
        except LmstackError as e:
            param = "max_tokens" if "max_new_tokens" in str(e) else ("messages" if chat else "prompt")
            raise _bad(param, str(e)) from None
        if dropped:
            raise ApiError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has "
                                f"{len(ids) + dropped} and max_tokens asks for {cfg.max_new_tokens}: shorten the "
                                f"prompt or lower max_tokens", "messages" if chat else "prompt",
                           "context_length_exceeded")
        if max_tokens is None and chat:
            cfg = cfg.replace(max_new_tokens=self.ctx - len(ids))
        return ids, cfg, n, bool(stream), bool(opts.get("include_usage", False))

    def submit(self, ids: list[int], cfg: GenerationConfig, n: int) -> list[Request]:
        loop = asyncio.get_running_loop()
        reqs: list[Request] = []
        try:
            for i in range(n):   # n choices: n requests, seeded seed, seed+1, ... so they differ reproducibly
                c = cfg if cfg.seed is None or i == 0 else cfg.replace(seed=cfg.seed + i)
                reqs.append(self.engine.submit(ids, c, loop))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(429, str(e), None, "queue_full", "rate_limit_error") from None
        return reqs

    def text_stream(self, cfg: GenerationConfig) -> TextStream:
        return TextStream(self.tokenizer, cfg.stop_strings, _skip_ids(self.tokenizer, cfg))


async def _run(req: Request) -> list[int]:
    try:
        return [t async for t, _ in req.atokens()]
    except LmstackError as e:
        raise ApiError(400, str(e)) from None
    finally:
        if req.finish_reason is None:   # the handler was cancelled: free the slot
            req.cancel()


def create_app(model: nn.Module, tokenizer: Any, model_name: str, *, max_batch: int = 8, max_queue: int = 64,
               api_key: str | None = None) -> Any:
    """The FastAPI app serving ``model`` under ``model_name``; its engine thread runs while the app runs.
    With ``api_key``, every ``/v1/`` route needs ``Authorization: Bearer <api_key>`` (else 401)."""
    srv = Server(model, tokenizer, model_name, max_batch, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        srv.engine.start()
        try:
            yield
        finally:
            srv.engine.stop()

    app = FastAPI(title="lmstack", lifespan=lifespan)
    app.state.server = srv

    def check_key(request: Any) -> None:
        # a check in each /v1/ route, not an HTTP middleware: Starlette's middleware hides the client's
        # disconnect from the route, and a route must see it to free the slot
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "Incorrect API key provided: pass the server's --api-key as the bearer token",
                               None, "invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Any, exc: ApiError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_body(request: Any) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "lmstack"}]}

    @app.get("/metrics")
    async def metrics() -> Any:
        m = srv.engine.metrics
        rows = [("lmstack_queue_length", "gauge", "requests waiting for a slot", m.queue_length),
                ("lmstack_running_requests", "gauge", "requests in the running batch", m.running),
                ("lmstack_requests_total", "counter", "requests accepted", m.requests_total),
                ("lmstack_generated_tokens_total", "counter", "tokens generated", m.tokens_total),
                ("lmstack_cancelled_requests_total", "counter", "requests dropped unfinished (client gone)",
                 m.cancelled_total)]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP lmstack_time_to_first_token_seconds time from submission to the first token",
                  "# TYPE lmstack_time_to_first_token_seconds summary",
                  f"lmstack_time_to_first_token_seconds_sum {m.ttft_seconds_sum}",
                  f"lmstack_time_to_first_token_seconds_count {m.ttft_count}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def handle(request: Any, chat: bool) -> Any:
        check_key(request)
        body = await read_body(request)
        ids, cfg, n, stream, include_usage = srv.parse(body, chat)
        reqs = srv.submit(ids, cfg, n)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(completion: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": completion,
                    "total_tokens": len(ids) + completion}

        def choice(i: int, text: str, finish: str | None, delta: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": i, ("delta" if delta else "message"): msg, "logprobs": None, "finish_reason": finish}

        if not stream:
            async def watch() -> None:   # a client that gives up on a non-streamed answer frees its slots too
                while not await request.is_disconnected():
                    await asyncio.sleep(0.05)
                for r in reqs:
                    r.cancel()

            watcher = asyncio.create_task(watch())
            try:
                outs = await asyncio.gather(*(_run(r) for r in reqs))
            finally:
                watcher.cancel()
            choices = []
            for i, (r, toks) in enumerate(zip(reqs, outs)):
                ts = srv.text_stream(cfg)
                choices.append(choice(i, ts.push(toks) + ts.finish(), r.finish_reason))
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(sum(map(len, outs)))}

        [req] = reqs
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": choices}
            return f"data: {json.dumps({**data, **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            ts = srv.text_stream(cfg)
            last = ""
            try:
                if chat:   # the first chunk names the role, as OpenAI's does
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
                async for tok, finished in req.atokens():
                    delta = ts.push([tok])
                    if finished:    # held back: the last content chunk carries the finish reason
                        last = delta
                    elif delta:
                        yield sse([choice(0, delta, None, delta=True)])
            except LmstackError as e:
                yield f"data: {json.dumps(ApiError(400, str(e)).body())}\n\n"
                return
            finally:
                if req.finish_reason is None:   # the client left (or the engine failed): free the slot now
                    req.cancel()
            yield sse([choice(0, last + ts.finish(), req.finish_reason, delta=True)])
            if include_usage:
                yield sse([], usage=usage(len(req.token_ids)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await handle(request, chat=True)

    return app
