"""Benchmark: the OpenAI-compatible server under concurrent streaming clients, continuous batching vs one request
at a time.

The server runs in its own process (``lmstack serve MODEL --max-batch B``); the clients are asyncio tasks in this
process, each sending streaming ``/v1/chat/completions`` requests (``stream_options.include_usage``) back to back
for ``--duration`` seconds. Modes: ``continuous`` (``--max-batch`` = the largest concurrency: every client's
request joins the running batch at the next decode step) and ``one-at-a-time`` (``--max-batch 1``: requests
queue and run alone). Per run: requests finished, output tokens/s (from the usage chunks), and mean / median /
p99 time to first token (TTFT), time per output token after the first (TPOT) and inter-token latency (ITL, the
gaps between streamed chunks), the figures vLLM's serving benchmark prints; plus malformed or failed responses.

    .venv/bin/python bench/serve.py --model runs/speedrun/chat_model          # 1, 8, 32 clients, 20 s each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    proc = subprocess.Popen([lmstack, "serve", model, "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", str(max_queue), "--model-name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(client, base: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens, finish, malformed = [], None, None, False
    async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                malformed = True
                continue
            if chunk.get("choices"):
                c = chunk["choices"][0]
                if c.get("delta", {}).get("content"):
                    arrivals.append(time.perf_counter())
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ok = not malformed and finish is not None and tokens is not None
    return {"ok": ok, "t0": t0, "arrivals": arrivals, "tokens": tokens or 0, "end": time.perf_counter()}


async def drive(base: str, concurrency: int, duration: float, max_tokens: int, prompts: list[str]) -> dict:
    import httpx

    results: list[dict] = []
    stop_at = time.perf_counter() + duration

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient() as client:
            k = i
            while time.perf_counter() < stop_at:
                results.append(await one_request(client, base, prompts[k % len(prompts)], max_tokens))
                k += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    good = [r for r in results if r.get("ok")]
    ttft = [(r["arrivals"][0] - r["t0"]) * 1000 for r in good if r["arrivals"]]
    tpot = [(r["end"] - r["arrivals"][0]) * 1000 / (r["tokens"] - 1) for r in good if r["arrivals"] and r["tokens"] > 1]
    itl = [(b - a) * 1000 for r in good for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {"concurrency": concurrency, "requests": len(good), "failed": len(results) - len(good),
            "wall_s": wall, "out_tok_s": sum(r["tokens"] for r in good) / wall,
            "req_s": len(good) / wall,
            "ttft": (statistics.fmean(ttft) if ttft else float("nan"), _pct(ttft, 0.5), _pct(ttft, 0.99)),
            "tpot": (statistics.fmean(tpot) if tpot else float("nan"), _pct(tpot, 0.5), _pct(tpot, 0.99)),
            "itl": (statistics.fmean(itl) if itl else float("nan"), _pct(itl, 0.5), _pct(itl, 0.99))}


PROMPTS = ["What does the os module provide?", "Return the number of items in a list.",
           "Explain what a context manager does.", "How do I read a file line by line?",
           "What is a generator?", "Describe the json module.", "What does sorted() return?",
           "How are exceptions raised?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "speedrun" / "chat_model"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--modes", nargs="+", default=["continuous", "one-at-a-time"],
                    choices=["continuous", "one-at-a-time"])
    args = ap.parse_args()
    if not Path(args.model).exists():   # `make bench` runs every script: skip, do not fail
        print(f"# bench/serve.py skipped: no model at {args.model} (run `lmstack speedrun` first or pass --model)")
        return
    rows = []
    for mode in args.modes:
        max_batch = max(args.concurrency) if mode == "continuous" else 1
        proc, base = start_server(args.model, max_batch, max_queue=4 * max(args.concurrency))
        try:
            for c in args.concurrency:   # no warm-up request: the first row includes the cold start
                r = asyncio.run(drive(base, c, args.duration, args.max_tokens, PROMPTS))
                r["mode"] = mode
                rows.append(r)
                print(f"{mode:14s} c={c:3d} {r['requests']:4d} req {r['out_tok_s']:8.1f} tok/s "
                      f"TTFT p50 {r['ttft'][1]:.1f} ms failed {r['failed']}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; model "
          f"{args.model}; {args.duration:.0f} s per row, max_tokens {args.max_tokens}, greedy, streaming; server and "
          f"clients share the machine.\n")
    print("| mode | clients | requests | failed | req/s | output tok/s | TTFT mean / p50 / p99 ms | TPOT mean / p50 / p99 ms "
          "| ITL mean / p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        f = lambda t: " / ".join(f"{x:.1f}" for x in t)
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['req_s']:.2f} | "
              f"{r['out_tok_s']:.1f} | {f(r['ttft'])} | {f(r['tpot'])} | {f(r['itl'])} |")
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    for c in args.concurrency:
        a, b = by.get(("continuous", c)), by.get(("one-at-a-time", c))
        if a and b and b["out_tok_s"] > 0:
            print(f"\n{c} clients: continuous batching {a['out_tok_s'] / b['out_tok_s']:.2f}x the output tokens/s "
                  f"of one at a time; TTFT p50 {a['ttft'][1]:.1f} vs {b['ttft'][1]:.1f} ms", end="")
    lone = by.get(("continuous", 1))
    if lone:
        for c in args.concurrency:
            a = by.get(("continuous", c))
            if a and c > 1:
                print(f"\ncontinuous, {c} clients: TTFT p50 {a['ttft'][1] / lone['ttft'][1]:.2f}x a lone request's",
                      end="")
    print()


if __name__ == "__main__":
    main()
