"""The speedrun's serving stage: the chat model behind ``lmstack serve``'s app on a free loopback port, driven by
the official ``openai`` client (chat, streaming, a JSON-schema reply), then a short load test, then stopped.

Checks that can fail, reported in the stage's table: the streamed reply equals the non-streamed one at
temperature 0 (and :func:`lmstack.infer.text.complete`), usage counts equal the ids generated, the JSON-schema
reply parses and validates, and the load test has no failed request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Self

from lmstack.errors import LmstackError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on a loopback port in a daemon thread, for as long as the ``with`` block runs."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None):
        self.app, self.host, self.port = app, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        import uvicorn

        self.port = self.port or _free_port()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="lmstack-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LmstackError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def serve_in_main(app: Any, work: Any) -> Any:
    """``work(url)`` against ``app`` as ``lmstack serve`` runs it: uvicorn in a thread, the engines in this (the
    calling, normally main) thread, the work in a worker thread; returns what ``work`` returns (or raises what it
    raised). ``app`` must come from ``create_app(..., start_engines=False)``; its engines end with the work."""
    from lmstack.serve.engine import Engine

    engines = [a.engine for a in app.state.arms]
    out: dict[str, Any] = {}
    with BackgroundServer(app) as server:
        def job() -> None:
            try:
                out["value"] = work(server.url)
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread below)
                out["error"] = e
            finally:
                engines[0].stop()

        worker = threading.Thread(target=job, name="lmstack-serve-work", daemon=True)
        worker.start()
        Engine.run_many(engines)
        worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


SCHEMA = {"type": "object", "properties": {"topic": {"type": "string", "maxLength": 40},
                                           "confident": {"type": "boolean"}},
          "required": ["topic", "confident"], "additionalProperties": False}


def speedrun_serve(run: Path, *, clients: int = 8, seconds: float = 4.0, max_tokens: int = 32, max_batch: int = 8,
                   seed: int = 0) -> tuple[dict[str, Any], str]:
    """Serve ``run/chat_model``, exercise it with the openai client and a load test; (results, report markdown)."""
    import openai

    from lmstack.infer.config import GenerationConfig
    from lmstack.infer.text import complete, load_run
    from lmstack.serve.app import create_app
    from lmstack.serve.loadtest import run_load

    model, tok = load_run(run / "chat_model")
    app = create_app(model, tok, "speedrun-chat", max_batch=max_batch, max_queue=4 * max(clients, max_batch),
                     start_engines=False)
    question = [{"role": "user", "content": "What does the os module provide?"}]
    checks: dict[str, Any] = {}
    def work(url: str) -> tuple[dict[int, Any], str]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        whole = client.chat.completions.create(model="speedrun-chat", messages=question, max_tokens=max_tokens,
                                               temperature=0, seed=seed)
        chunks = list(client.chat.completions.create(model="speedrun-chat", messages=question, max_tokens=max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reference = complete(model, tok, question, GenerationConfig(max_new_tokens=max_tokens))
        checks["reply"] = whole.choices[0].message.content
        checks["stream_equals_whole"] = streamed == whole.choices[0].message.content
        checks["whole_equals_library"] = whole.choices[0].message.content == reference.text
        checks["usage_exact"] = (whole.usage.completion_tokens == reference.n_tokens
                                 and chunks[-1].usage.completion_tokens == reference.n_tokens)
        try:
            fmt = {"type": "json_schema", "json_schema": {"name": "topic", "schema": SCHEMA}}
            js = client.chat.completions.create(model="speedrun-chat", messages=question, max_tokens=64,
                                                temperature=0, response_format=fmt)
            value = json.loads(js.choices[0].message.content)
            import jsonschema

            jsonschema.validate(value, SCHEMA)
            checks["json_schema_reply"], checks["json_schema_valid"] = js.choices[0].message.content, True
        except ImportError:
            checks["json_schema_valid"] = None      # llguidance / jsonschema not installed: the row says so
        loads = {}
        for c in sorted({1, clients}):
            loads[c] = run_load(url, c, seconds, max_tokens=max_tokens, ignore_eos=True).summary()
        return loads, client._client.get(url + "/metrics").text

    # the engine in this thread, as lmstack serve runs it (a second thread's forwards run ~2x slower here)
    loads, metrics_text = serve_in_main(app, work)
    checks["metrics_running_after"] = "lmstack_running_requests 0\n" in metrics_text
    results = {"checks": checks, "load": {str(k): v for k, v in loads.items()}}
    (run / "serve").mkdir(exist_ok=True)
    from lmstack.runs import atomic_write_json

    atomic_write_json(run / "serve" / "load.json", results)
    return results, _report(checks, loads, clients, seconds, max_tokens)


def _report(checks: dict[str, Any], loads: dict[int, dict[str, Any]], clients: int, seconds: float,
            max_tokens: int) -> str:
    ok = lambda v: "yes" if v else ("not run (llguidance/jsonschema missing)" if v is None else "**no**")
    lines = ["The chat model behind `lmstack serve`'s app on a loopback port, driven by the official `openai` client.",
             "", "| check | result |", "|---|---|",
             f"| streamed reply equals the non-streamed one (temperature 0) | {ok(checks['stream_equals_whole'])} |",
             f"| the server's reply equals `complete()` | {ok(checks['whole_equals_library'])} |",
             f"| usage counts exact (response and final stream chunk) | {ok(checks['usage_exact'])} |",
             f"| `response_format` json_schema reply validates | {ok(checks.get('json_schema_valid'))} |",
             f"| `/metrics` running requests back to 0 after the load | {ok(checks['metrics_running_after'])} |",
             "", f"Reply: `{checks['reply'][:120]!s}`" + (f"; JSON reply: `{checks['json_schema_reply']}`"
                                                         if checks.get("json_schema_reply") else ""),
             "", (f"Load test ({seconds:g} s per row, streaming chat, {max_tokens} tokens per request with `ignore_eos`, "
                 "continuous batching; clients share the machine with the server):"), "",
             "| clients | requests | failed | output tok/s | TTFT p50 ms | TPOT p50 ms | ITL p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c, s in loads.items():
        lines.append(f"| {c} | {s['requests']} | {s['failed']} | {s['output_throughput']:.0f} | "
                     f"{s['ttft_ms']['median']:.1f} | {s['tpot_ms']['median']:.1f} | {s['itl_ms']['p99']:.1f} |")
    if 1 in loads and clients in loads and clients != 1 and loads[1]["output_throughput"] > 0:
        lines += ["", (f"{clients} clients get {loads[clients]['output_throughput'] / loads[1]['output_throughput']:.2f}x "
                      f"one client's output tokens/s.")]
    return "\n".join(lines) + "\n"
