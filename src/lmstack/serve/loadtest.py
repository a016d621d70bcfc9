"""Load tests of an OpenAI-compatible server: N streaming clients for a fixed duration, and the figures vLLM's
serving benchmark prints (request throughput, output tokens/s, mean / median / p99 TTFT, TPOT and ITL).

    result = run_load("http://127.0.0.1:8000", concurrency=8, duration=20, max_tokens=64)
    print(format_result(result))

Each client sends streaming ``/v1/chat/completions`` requests back to back (``stream_options.include_usage``,
so the token count is the server's own), from a rotating list of prompts. Per request: TTFT is the time to the
first content chunk, TPOT the time after it divided by the remaining tokens, ITL the gaps between content
chunks. A response that is not 200, has an unparsable chunk, lacks a finish reason or a usage chunk counts as
failed (``failed``), never silently dropped. ``ignore_eos`` (a vLLM extension lmstack serve accepts) makes
every request produce its ``max_tokens`` tokens, so rows compare equal work; ``range_ratio`` (vLLM's
``--random-range-ratio``) spreads ``max_tokens`` over ``[1 - r, 1 + r]`` times the given value, the same sequence in
every run, so that clients do not all finish, and arrive again, in the same step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import LmstackError

DEFAULT_PROMPTS = ["What does the os module provide?", "Return the number of items in a list.",
                   "Explain what a context manager does.", "How do I read a file line by line?",
                   "What is a generator?", "Describe the json module.", "What does sorted() return?",
                   "How are exceptions raised?"]


@dataclass
class LoadResult:
    """One load-test run."""

    concurrency: int
    duration_s: float
    requests: int = 0
    failed: int = 0
    status_codes: dict[int, int] = field(default_factory=dict)
    output_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)

    @property
    def request_throughput(self) -> float:
        return self.requests / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[float]) -> dict[str, float]:
            if not xs:
                return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
            return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "p99": percentile(xs, 0.99)}

        return {"concurrency": self.concurrency, "duration_s": round(self.duration_s, 3), "requests": self.requests,
                "failed": self.failed, "status_codes": dict(self.status_codes),
                "request_throughput": self.request_throughput, "output_tokens": self.output_tokens,
                "output_throughput": self.output_throughput, "ttft_ms": stats(self.ttft_ms),
                "tpot_ms": stats(self.tpot_ms), "itl_ms": stats(self.itl_ms)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation (numpy's default), of a non-empty sequence."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _one(client: Any, url: str, body: dict[str, Any], result: LoadResult) -> None:
    t0 = time.perf_counter()
    arrivals: list[float] = []
    finish, tokens, malformed = None, None, False
    try:
        async with client.stream("POST", url, json=body, timeout=600) as r:
            if r.status_code != 200:
                await r.aread()
                result.status_codes[r.status_code] = result.status_codes.get(r.status_code, 0) + 1
                result.failed += 1
                return
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
                if "error" in chunk:
                    malformed = True
                for c in chunk.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        arrivals.append(time.perf_counter())
                    if c.get("finish_reason"):
                        finish = c["finish_reason"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception:  # noqa: BLE001  (a dropped connection is a failed request, counted)
        result.failed += 1
        return
    result.status_codes[200] = result.status_codes.get(200, 0) + 1
    if malformed or finish is None or tokens is None:
        result.failed += 1
        return
    end = time.perf_counter()
    result.requests += 1
    result.output_tokens += tokens
    if arrivals:
        result.ttft_ms.append((arrivals[0] - t0) * 1000)
        result.itl_ms += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
        if tokens > 1:
            result.tpot_ms.append((end - arrivals[0]) * 1000 / (tokens - 1))


async def drive(base_url: str, concurrency: int, duration: float, max_tokens: int = 64,
                prompts: Sequence[str] = DEFAULT_PROMPTS, model: str | None = None, api_key: str | None = None,
                ignore_eos: bool = False, temperature: float = 0.0, range_ratio: float = 0.0) -> LoadResult:
    """Run the load test in the current event loop (see the module docstring)."""
    import httpx

    if concurrency < 1 or duration <= 0 or max_tokens < 1 or not prompts:
        raise LmstackError("load test: concurrency >= 1, duration > 0, max_tokens >= 1 and prompts are needed")
    if not 0 <= range_ratio < 1:
        raise LmstackError(f"load test: range_ratio must be in [0, 1), got {range_ratio}")
    base = base_url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(headers=headers, limits=limits) as client:
        if model is None:
            try:
                r = await client.get(base + "/v1/models", timeout=10)
                model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise LmstackError(f"--url {base_url}: cannot list the server's models ({e}); is it running?") from None
        url = base + "/v1/chat/completions"
        result = LoadResult(concurrency, duration)
        stop_at = time.perf_counter() + duration

        async def client_loop(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                # vLLM's --random-range-ratio: output lengths spread over max_tokens * [1 - r, 1 + r] (a fixed
                # sequence per request index), so clients do not finish in lockstep
                n = max_tokens if not range_ratio else max(1, round(max_tokens * (1 - range_ratio + 2 * range_ratio
                                                                                    * ((k * 0.6180339887) % 1))))
                body = {"model": model, "messages": [{"role": "user", "content": prompts[k % len(prompts)]}],
                        "max_tokens": n, "temperature": temperature, "stream": True,
                        "stream_options": {"include_usage": True}}
                if ignore_eos:
                    body["ignore_eos"] = True
                await _one(client, url, body, result)
                k += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        result.duration_s = time.perf_counter() - t0    # the last requests finish after the deadline
        return result


def run_load(base_url: str, concurrency: int, duration: float, **options: Any) -> LoadResult:
    """:func:`drive` in a fresh event loop."""
    return asyncio.run(drive(base_url, concurrency, duration, **options))


def format_result(r: LoadResult) -> str:
    """The result as vLLM's serving benchmark lays it out."""
    s = r.summary()
    lines = [f"{'=' * 16} Serving Benchmark Result {'=' * 16}",
             f"{'Concurrency:':<40}{r.concurrency:>10}",
             f"{'Successful requests:':<40}{r.requests:>10}",
             f"{'Failed requests:':<40}{r.failed:>10}",
             f"{'Benchmark duration (s):':<40}{r.duration_s:>10.2f}",
             f"{'Total generated tokens:':<40}{r.output_tokens:>10}",
             f"{'Request throughput (req/s):':<40}{r.request_throughput:>10.2f}",
             f"{'Output token throughput (tok/s):':<40}{r.output_throughput:>10.2f}"]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency")):
        short = key.split("_")[0].upper()
        lines.append(f"{'-' * 10}{title:^38}{'-' * 10}")
        lines += [f"{f'{label} {short} (ms):':<40}{s[key][stat]:>10.2f}"
                  for label, stat in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))]
    lines.append("=" * 58)
    return "\n".join(lines)
