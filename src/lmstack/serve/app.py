"""The OpenAI-compatible HTTP front of :class:`lmstack.serve.engine.Engine` (FastAPI; SSE for streaming).

    app = create_app(model, tokenizer, "stories", max_batch=8, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream`` with
``stream_options.include_usage``; ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
``logprobs``/``top_logprobs``, ``presence_penalty``, ``frequency_penalty``, ``response_format`` text /
json_object / json_schema, ``tools``/``tool_choice``), ``/v1/embeddings`` (with an ``embedder``),
``/v1/feedback`` (thumbs and comments on an answer, by its response id), ``/health``, ``/metrics``
(Prometheus text) and the chat page at ``/``. Prompts and chat conversations go through
:func:`lmstack.infer.text.prepare_prompts`, the rule the CLI's ``generate`` and ``chat`` follow (the folder's chat
template, the EOS / end-of-turn stops), and text through its :class:`~lmstack.infer.text.TextStream`; so a
request at temperature 0 answers what ``complete`` answers. Errors carry OpenAI's body (see
:mod:`lmstack.serve.protocol`): 400 for a bad parameter, malformed JSON or a prompt too long for the context,
401 for a wrong API key, 404 for another model's name or an unknown response id, 408 past the request timeout,
429 when the queue is full.

Every finished request is recorded in the interaction log (``log_store``: a :mod:`lmstack.monitor` store; by
default a SQLite file for the server's lifetime) under its response id, which is what ``/v1/feedback`` (and the
``/review`` and ``/pairwise`` pages of :func:`lmstack.monitor.web.feedback_router`) take.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from lmstack.errors import LmstackError
from lmstack.extras import require

require("fastapi", "lmstack serve")
from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from lmstack.infer.config import GenerationConfig
from lmstack.infer.text import TextStream, prepare_prompts, skip_ids
from lmstack.serve import protocol as p
from lmstack.serve.engine import Engine, QueueFull, Request, RequestTimeout
from lmstack.serve.protocol import ApiError, ToolUse


@dataclass
class Parsed:
    """A checked generation request."""

    ids: list[int]
    config: GenerationConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    tools: ToolUse = field(default_factory=ToolUse)
    user: str | None = None
    input_text: str = ""              # the last user message or the prompt, for the interaction log


class Server:
    """The state behind the routes: the model, its engine, and the request rules."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, max_batch: int, max_queue: int,
                 scheduling: str = "continuous", request_timeout: float | None = None, embedder: Any = None,
                 embedder_name: str | None = None, log_store: Any = None, prefill_chunk: int | None = 256,
                 prefix_cache_tokens: int = 4096, engine_cond: Any = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, scheduling=scheduling,
                             request_timeout=request_timeout, prefill_chunk=prefill_chunk,
                             prefix_cache_tokens=prefix_cache_tokens, cond=engine_cond)
        self.ctx = int(model.config.max_seq_len)
        self.created = int(time.time())
        self.embedder, self.embedder_name = embedder, embedder_name
        self.log = log_store                 # a lmstack.monitor LogStore
        self.label, self.arm = model_name, None   # what the log records as the model, and the A/B arm
        self.hf_template = getattr(tokenizer, "chat_template", None) is not None

    def parse(self, body: Mapping[str, Any], chat: bool) -> Parsed:
        """The checked request, or an :class:`ApiError` naming the field."""
        model = body.get("model")
        if not isinstance(model, str):
            raise p.bad("model", "required: the model's name (GET /v1/models lists it)")
        if model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        for name, defaults in p.UNSUPPORTED.items():
            if name in body and body[name] not in defaults:
                raise ApiError(400, f"{name}: not supported by this server", name, "unsupported_parameter")
        max_tokens = p.integer(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                               else "max_tokens", 0)
        temperature = p.number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = p.number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        presence = p.number(body, "presence_penalty", 0.0, -2.0, 2.0)
        frequency = p.number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise p.bad("seed", f"must be an integer, got {seed!r}")
        n = p.integer(body, "n", 1, 16) or 1
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise p.bad("stream", f"must be a boolean, got {stream!r}")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise p.bad("stream_options", "must be an object")
        if stream and n > 1:
            raise ApiError(400, "n: more than one choice is not supported with stream=true", "n",
                           "unsupported_parameter")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise p.bad("user", "must be a string")
        # log-probs: chat takes logprobs (bool) + top_logprobs (0-20); completions take logprobs (0-5)
        if chat:
            want = body.get("logprobs")
            if want is not None and not isinstance(want, bool):
                raise p.bad("logprobs", f"must be a boolean, got {want!r}")
            top = p.integer(body, "top_logprobs", 0, 20) or 0
            if top and not want:
                raise p.bad("top_logprobs", "needs logprobs: true")
            want = bool(want)
        else:
            k = p.integer(body, "logprobs", 0, 5)
            want, top = k is not None, k or 0
        tools = p.tool_use(body) if chat else ToolUse()
        schema = p.json_schema(body)
        if tools.forced:
            if schema is not None:
                raise p.bad("response_format", "cannot be combined with a forced tool_choice")
            schema = p.tool_call_schema(tools)
        if chat:
            msgs = p.messages(body)
            if tools.tools and not self.hf_template:
                msgs, template_tools = p.for_plain_template(msgs, tools.tools), None
            else:
                msgs, template_tools = p.for_hf_template(msgs), (tools.tools or None)
            prompt: Any = msgs
            input_text = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        else:
            prompt, template_tools = p.prompt(body), None
            input_text = prompt if isinstance(prompt, str) else ""
        # the default (no max_tokens) is OpenAI's 16 for completions and the rest of the context for chat
        first = GenerationConfig(max_new_tokens=max_tokens if max_tokens is not None else (0 if chat else 16),
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                                 top_p=top_p, seed=seed, stop_strings=p.stops(body), presence_penalty=presence,
                                 frequency_penalty=frequency, json_schema=schema, output_logprobs=want,
                                 top_logprobs=top)
        try:
            [ids], [dropped], cfg = prepare_prompts(self.model, self.tokenizer, [prompt], first, chat=chat,
                                                    tools=template_tools)
        except LmstackError as e:
            param = "max_tokens" if "max_new_tokens" in str(e) else ("messages" if chat else "prompt")
            raise p.bad(param, str(e)) from None
        if dropped:
            raise ApiError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has "
                                f"{len(ids) + dropped} and max_tokens asks for {cfg.max_new_tokens}: shorten the "
                                f"prompt or lower max_tokens", "messages" if chat else "prompt",
                           "context_length_exceeded")
        if max_tokens is None and chat:
            cfg = cfg.replace(max_new_tokens=self.ctx - len(ids))
        # vLLM's extensions, for benchmarks that need equal work per request: no stop before min_tokens
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise p.bad("ignore_eos", f"must be a boolean, got {ignore_eos!r}")
        min_tokens = p.integer(body, "min_tokens", 0) or 0
        if ignore_eos or min_tokens:
            cfg = cfg.replace(min_new_tokens=cfg.max_new_tokens if ignore_eos else min(min_tokens, cfg.max_new_tokens))
        return Parsed(ids, cfg, n, bool(stream), bool(opts.get("include_usage", False)), want, tools, user,
                      input_text)

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
        return TextStream(self.tokenizer, cfg.stop_strings, skip_ids(self.tokenizer, cfg))

    def shown(self, req: Request, cfg: GenerationConfig) -> tuple[list[int], list[float], list[list]]:
        """The generated ids that are part of the text (stop and special ids left out), with their log-probs."""
        skip = skip_ids(self.tokenizer, cfg)
        seq = req.seq
        keep = [k for k, t in enumerate(req.token_ids) if t not in skip]
        lps = seq.logprobs if seq is not None else []
        tops = seq.top_logprobs if seq is not None else []
        return ([req.token_ids[k] for k in keep], [lps[k] for k in keep if k < len(lps)],
                [tops[k] for k in keep if k < len(tops)])

    async def record(self, rid: str, body: Mapping[str, Any], parsed: Parsed, reqs: list[Request],
                     texts: list[str], chat: bool, started: float) -> None:
        """One interaction-log row per response (all of its choices), under the response id, written before the
        response ends (so feedback on it can follow at once); a failing store is reported, not raised."""
        from starlette.concurrency import run_in_threadpool

        from lmstack.monitor.store import interaction_from_request

        r0 = reqs[0]
        ttft = (r0.first_token_at - r0.submitted) if r0.first_token_at is not None else None
        try:
            row = interaction_from_request(
                dict(body), texts[0] if texts else "", model=self.label, arm=self.arm, id=rid,
                route="chat" if chat else "completions", finish_reason=r0.finish_reason or "",
                prompt_tokens=len(parsed.ids), completion_tokens=sum(len(r.token_ids) for r in reqs),
                latency_s=time.monotonic() - started, ttft_s=ttft,
                meta={"choices": texts} if len(texts) > 1 else {})
            await run_in_threadpool(self.log.log, row)
        except Exception as e:  # noqa: BLE001  (the answer must not fail because the log did)
            print(f"[serve] interaction log: {type(e).__name__}: {e}", flush=True)


async def _run(req: Request) -> list[int]:
    try:
        return [t async for t, _ in req.atokens()]
    except RequestTimeout as e:
        raise ApiError(408, str(e), None, "timeout", "timeout_error") from None
    except LmstackError as e:
        raise ApiError(400, str(e)) from None
    finally:
        if req.finish_reason is None:   # the handler was cancelled: free the slot
            req.cancel()


def _page() -> str:
    return resources.files("lmstack.serve").joinpath("ui/chat.html").read_text(encoding="utf-8")


def create_app(model: nn.Module, tokenizer: Any, model_name: str, *, max_batch: int = 8, max_queue: int = 64,
               api_key: str | None = None, scheduling: str = "continuous", request_timeout: float | None = None,
               embedder: Any = None, embedder_name: str | None = None, log_store: Any = None,
               prefill_chunk: int | None = 256, prefix_cache_tokens: int = 4096, label: str | None = None,
               candidate: tuple[nn.Module, Any, str] | None = None, candidate_share: float = 0.5,
               experiment: str = "ab", start_engines: bool = True) -> Any:
    """The FastAPI app serving ``model`` under ``model_name``; its engine thread runs while the app runs.

    With ``api_key``, every ``/v1/`` route needs ``Authorization: Bearer <api_key>`` (else 401).
    ``scheduling``: ``continuous`` (requests join the running batch at every step) or ``static`` (only an
    empty batch admits; the baseline). ``request_timeout``: seconds a request may take, waiting included (408).
    ``embedder``: a :class:`lmstack.rag.embed.Embedder` served at ``/v1/embeddings`` as ``embedder_name``.
    ``log_store``: where interactions and feedback go (an object with ``log(row)`` and ``add_feedback(fb)``).
    ``prefill_chunk``: prompt ids prefilled per decode step (None: whole prompts at admission);
    ``prefix_cache_tokens``: positions of finished prefills kept for prompts sharing a prefix (0: off).
    ``label``: the model's name in the interaction log (default ``model_name``).
    ``candidate``: ``(model, tokenizer, label)`` of a B arm: an A/B test under ``experiment``, where each request
    goes to B with probability ``candidate_share``, sticky per ``user`` (or ``X-Session-Id`` header; a request
    with neither is assigned at random); both arms answer under ``model_name`` and the log records each row's
    arm (``A``/``B``) and model label, which is what :func:`lmstack.monitor.ab.decide` reads.
    ``start_engines``: the app's lifespan starts each arm's engine in a thread (False: the caller runs them, as
    ``lmstack serve`` runs arm A's in the main thread; ``app.state.arms[i].engine``)."""
    from lmstack.monitor.store import open_store
    from lmstack.monitor.web import feedback_router

    scratch = None
    if log_store is None:   # no store given: a SQLite file for this server's lifetime, removed when it stops
        scratch = tempfile.mkdtemp(prefix="lmstack-serve-log-")
        log_store = open_store(Path(scratch) / "interactions.db")
    import threading

    shared = threading.Condition()   # one condition for the arms' engines, so one thread can run them all
    srv = Server(model, tokenizer, model_name, max_batch, max_queue, scheduling, request_timeout, embedder,
                 embedder_name or ("embeddings" if embedder is not None else None), log_store, prefill_chunk,
                 prefix_cache_tokens, shared)
    srv.label = label or model_name
    arms = [srv]
    shares: dict[str, float] = {}
    if candidate is not None:
        from lmstack.monitor.ab import assign, check_shares

        if not 0 < candidate_share < 1:
            raise LmstackError(f"candidate_share: must be in (0, 1), got {candidate_share}")
        shares = check_shares({"A": 1 - candidate_share, "B": candidate_share})
        cand_model, cand_tok, cand_label = candidate
        b = Server(cand_model, cand_tok, model_name, max_batch, max_queue, scheduling, request_timeout, None, None,
                   log_store, prefill_chunk, prefix_cache_tokens, shared)
        srv.arm, b.arm, b.label = "A", "B", cand_label
        arms.append(b)

    def route(body: Mapping[str, Any], request: Any) -> Server:
        """The arm that answers this request (sticky per user or session)."""
        if len(arms) == 1:
            return srv
        unit = body.get("user") if isinstance(body.get("user"), str) else request.headers.get("x-session-id")
        arm = assign(unit if unit else uuid.uuid4().hex, experiment, shares)
        return arms[0] if arm == "A" else arms[1]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for arm in arms if start_engines else []:
            arm.engine.start()
        try:
            yield
        finally:
            for arm in arms if start_engines else []:
                arm.engine.stop()
            if scratch is not None:
                log_store.close()
                shutil.rmtree(scratch, ignore_errors=True)

    app = FastAPI(title="lmstack", lifespan=lifespan)
    app.state.server = srv
    app.state.arms = arms

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

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _page()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict[str, Any]:
        check_key(request)
        names = [model_name] + ([srv.embedder_name] if srv.embedder is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": srv.created,
                                            "owned_by": "lmstack"} for n in names]}

    @app.get("/metrics")
    async def metrics() -> Any:
        text = "".join(_metrics_text(a.engine, "" if a is srv else f'{{arm="{a.arm}"}}') for a in arms)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _metrics_text(engine: Engine, labels: str) -> str:
        m = engine.metrics
        rows = [("lmstack_queue_length", "gauge", "requests waiting for a slot", m.queue_length),
                ("lmstack_running_requests", "gauge", "requests in the running batch", m.running),
                ("lmstack_requests_total", "counter", "requests accepted", m.requests_total),
                ("lmstack_generated_tokens_total", "counter", "tokens generated", m.tokens_total),
                ("lmstack_generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
                 round(m.tokens_per_second(), 3)),
                ("lmstack_cancelled_requests_total", "counter", "requests dropped unfinished (client gone, timeout)",
                 m.cancelled_total),
                ("lmstack_timed_out_requests_total", "counter", "requests stopped at the request timeout",
                 m.timeouts_total)]
        batch = engine.batch
        if batch is not None:
            rows += [("lmstack_prefill_tokens_total", "counter", "prompt tokens run through the model",
                      batch.stats["prefill_tokens"]),
                     ("lmstack_prefix_cache_hits_total", "counter", "prompts that reused a cached prefix",
                      batch.stats["prefix_hits"]),
                     ("lmstack_prefix_cache_tokens_reused_total", "counter", "prompt tokens taken from the cache",
                      batch.stats["prefix_tokens_reused"])]
        lines = []
        head = not labels    # HELP/TYPE once, with the first (unlabelled) arm
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"] if head else []
            lines.append(f"{name}{labels} {value}")
        for name, help_, hist in (
                ("lmstack_time_to_first_token_seconds", "time from submission to the first token", m.ttft),
                ("lmstack_inter_token_latency_seconds", "time between a request's consecutive tokens", m.itl)):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] if head else []
            extra = labels[1:-1] + "," if labels else ""
            lines += [f'{name}_bucket{{{extra}le="{le}"}} {c}' for le, c in hist.cumulative()]
            lines += [f"{name}_sum{labels} {hist.total}", f"{name}_count{labels} {hist.count}"]
        return "\n".join(lines) + "\n"

    async def handle(request: Any, chat: bool) -> Any:
        check_key(request)
        body = await read_body(request)
        arm = route(body, request)   # the server of this request's A/B arm (arm A without a test)
        parsed = arm.parse(body, chat)
        ids, cfg = parsed.ids, parsed.config
        started = time.monotonic()
        reqs = arm.submit(ids, cfg, parsed.n)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(completion: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": completion,
                    "total_tokens": len(ids) + completion}

        def logprobs_of(shown_ids: list[int], lps: list[float], tops: list[list]) -> Any:
            if not parsed.logprobs:
                return None
            if chat:
                return p.chat_logprobs(arm.tokenizer, shown_ids, lps, tops)
            return p.completion_logprobs(arm.tokenizer, shown_ids, lps, tops)

        def choice(i: int, text: str, finish: str | None, logprobs: Any = None, delta: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            calls = p.parse_tool_calls(text, parsed.tools) if finish is not None else None
            if calls:
                msg = {"content": None, "tool_calls": [{**c, "index": k} for k, c in enumerate(calls)]} if delta \
                    else {"role": "assistant", "content": None, "tool_calls": calls}
                return {"index": i, ("delta" if delta else "message"): msg, "logprobs": logprobs,
                        "finish_reason": "tool_calls"}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": i, ("delta" if delta else "message"): msg, "logprobs": logprobs, "finish_reason": finish}

        if not parsed.stream:
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
            choices, texts = [], []
            for i, (r, toks) in enumerate(zip(reqs, outs)):
                ts = arm.text_stream(cfg)
                texts.append(ts.push(toks) + ts.finish())
                choices.append(choice(i, texts[-1], r.finish_reason, logprobs_of(*arm.shown(r, cfg))))
            await arm.record(rid, body, parsed, reqs, texts, chat, started)
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(sum(map(len, outs)))}

        [req] = reqs
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        hold = parsed.tools.choice != "none" and chat   # a reply that may be a tool call is sent whole, at the end

        def sse(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": choices}
            return f"data: {json.dumps({**data, **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            ts = arm.text_stream(cfg)
            text, pending, sent = "", "", 0      # pending: text held back; sent: shown ids already reported
            skip = skip_ids(arm.tokenizer, cfg)
            n_shown = 0

            def lp_chunk() -> Any:
                nonlocal sent
                if not parsed.logprobs:
                    return None
                shown_ids, lps, tops = arm.shown(req, cfg)
                out = logprobs_of(shown_ids[sent:n_shown], lps[sent:n_shown], tops[sent:n_shown])
                sent = n_shown
                return out

            try:
                if chat:   # the first chunk names the role, as OpenAI's does
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
                async for tok, finished in req.atokens():
                    delta = ts.push([tok])
                    n_shown += tok not in skip
                    text += delta
                    if finished or hold:    # the last content chunk carries the finish reason
                        pending += delta
                    elif delta:
                        yield sse([choice(0, delta, None, lp_chunk(), delta=True)])
            except RequestTimeout as e:
                yield f"data: {json.dumps(ApiError(408, str(e), None, 'timeout', 'timeout_error').body())}\n\n"
                return
            except LmstackError as e:
                yield f"data: {json.dumps(ApiError(400, str(e)).body())}\n\n"
                return
            finally:
                if req.finish_reason is None:   # the client left (or the engine failed): free the slot now
                    req.cancel()
            tail = ts.finish()
            text += tail
            last = choice(0, (text if hold else pending + tail), req.finish_reason, lp_chunk(), delta=True)
            yield sse([last])
            await arm.record(rid, body, parsed, reqs, [text], chat, started)
            if parsed.include_usage:
                yield sse([], usage=usage(len(req.token_ids)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: HttpRequest) -> Any:
        check_key(request)
        body = await read_body(request)
        if srv.embedder is None:
            raise ApiError(404, "this server has no embedding model (start it with --embedder DIR)", "model",
                           "model_not_found")
        if body.get("model") != srv.embedder_name:
            raise ApiError(404, f"The model {body.get('model')!r} does not exist; embeddings are served by "
                                f"{srv.embedder_name!r}", "model", "model_not_found")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise p.bad("input", "must be a string or a non-empty list of strings")
        if len(texts) > 2048:
            raise p.bad("input", f"at most 2048 inputs per request, got {len(texts)}")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise p.bad("encoding_format", f"must be float or base64, got {fmt!r}")
        dims = p.integer(body, "dimensions", 1)
        if dims is not None and dims != srv.embedder.dim:
            raise ApiError(400, f"dimensions: this model gives {srv.embedder.dim}-dimensional vectors only",
                           "dimensions", "unsupported_parameter")
        vectors = await asyncio.to_thread(srv.embedder.embed, texts)       # off the event loop
        n_tokens = sum(len(ids) for ids in srv.embedder.token_ids(texts))
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": srv.embedder_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    # thumbs, comments and pairwise choices on logged answers; the review and pairwise pages (lmstack.monitor)
    def require_key(request: HttpRequest) -> None:
        check_key(request)

    app.include_router(feedback_router(srv.log), dependencies=[Depends(require_key)])

    return app
