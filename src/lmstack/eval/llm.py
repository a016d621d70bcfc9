"""The ``LLM`` client the judges and generative benchmarks call, with two implementations.

    llm = LocalLLM(model, tokenizer)                                   # an lmstack model through lmstack.infer
    llm = OpenAICompatible("http://localhost:8000/v1", "my-model")     # any OpenAI-compatible endpoint
    [[c]] = llm.complete(["Rate this summary ..."], max_tokens=5, top_logprobs=5)
    c.text, c.top_logprobs[0]                                          # '4', {'4': -0.2, '5': -1.9, ...}

``complete(prompts, ...)`` returns, per prompt, ``n`` :class:`Completion` s. ``top_logprobs=k`` asks
for the k most likely tokens at every generated position (where the backend can give them; an
endpoint that cannot returns ``None`` and the judges fall back to sampling).

The HTTP client uses only the standard library: requests run ``max_concurrency`` at a time, failures
that may pass (connection errors, HTTP 408/409/429/5xx) are retried with exponential back-off, and every
answered request is stored in an on-disk cache keyed by a hash of the full request body, so re-running
an evaluation costs nothing. The API key is read from the environment variable named by ``api_key_env``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmstack.errors import ConfigError, LmstackError


@dataclass
class Completion:
    text: str
    top_logprobs: list[dict[str, float]] | None = None   # per generated token: alternative token text -> logprob
    finish_reason: str | None = None


@runtime_checkable
class LLM(Protocol):
    name: str

    def complete(self, prompts: Sequence[str], *, max_tokens: int = 256, temperature: float = 0.0, n: int = 1,
                 stop: Sequence[str] = (), top_logprobs: int = 0,
                 seed: int | None = None) -> list[list[Completion]]: ...


class DiskCache:
    """One JSON file per request under ``folder``, named by the SHA-256 of the canonical request."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, request: dict[str, Any]) -> Any | None:
        path = self.folder / f"{self.key(request)}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except (json.JSONDecodeError, KeyError):
            return None  # a damaged entry is just a miss

    def put(self, request: dict[str, Any], response: Any) -> None:
        from lmstack.runs import atomic_write_json

        atomic_write_json(self.folder / f"{self.key(request)}.json", {"request": request, "response": response})


# ---------------------------------------------------------------------------------------------------- local


class LocalLLM:
    """An lmstack decoder and tokenizer behind the ``LLM`` interface (generation by :mod:`lmstack.infer`)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "local", batch_size: int = 8,
                 cache_dir: str | os.PathLike | None = None):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.cache = DiskCache(cache_dir) if cache_dir else None

    def complete(self, prompts: Sequence[str], *, max_tokens: int = 256, temperature: float = 0.0, n: int = 1,
                 stop: Sequence[str] = (), top_logprobs: int = 0, seed: int | None = None) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            request = {"model": self.name, "prompts": chunk, "max_tokens": max_tokens, "temperature": temperature,
                       "n": n, "stop": list(stop), "top_logprobs": top_logprobs, "seed": seed}
            cached = self.cache.get(request) if self.cache else None
            if cached is not None:
                out += [[Completion(**c) for c in row] for row in cached]
                continue
            rows = self._generate(chunk, max_tokens, temperature, n, stop, top_logprobs, seed)
            if self.cache:
                self.cache.put(request, [[asdict(c) for c in row] for row in rows])
            out += rows
        return out

    def _generate(self, prompts: list[str], max_tokens: int, temperature: float, n: int, stop: Sequence[str],
                  top_logprobs: int, seed: int | None) -> list[list[Completion]]:
        # Prompts longer than the context lose their beginning (few-shot examples), as lm-evaluation-harness
        # does; that and the stop and decoding rules are lmstack.infer.text.complete_batch's.
        from lmstack.infer import GenerationConfig
        from lmstack.infer.text import complete_batch

        sample = temperature > 0
        cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                               num_return_sequences=n if sample else 1, seed=seed, top_logprobs=top_logprobs,
                               output_logprobs=top_logprobs > 0, stop_strings=[s for s in stop if s])
        done = complete_batch(self.model, self.tokenizer, prompts, cfg)
        per = n if sample else 1
        rows: list[list[Completion]] = []
        for p in range(len(prompts)):
            comps = []
            for c in done[p * per:(p + 1) * per]:
                tops = None if c.top_logprobs is None else [
                    {self.tokenizer.decode([i]): v for i, v in pos} for pos in c.top_logprobs]
                comps.append(Completion(c.text, tops, c.finish_reason))
            rows.append(comps if sample else comps * n)  # greedy: n identical answers
        return rows


# ----------------------------------------------------------------------------------------------------- HTTP

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAICompatible:
    """Any OpenAI-compatible endpoint (``/chat/completions`` or ``/completions``), cached, concurrent, retried."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", mode: str = "chat",
                 cache_dir: str | os.PathLike | None = None, max_concurrency: int = 4, max_retries: int = 4,
                 timeout_s: float = 60.0, backoff_s: float = 0.5, system_prompt: str | None = None):
        if mode not in ("chat", "completions"):
            raise ConfigError(f"OpenAI-compatible client: mode must be 'chat' or 'completions', got {mode!r}")
        self.base_url, self.model, self.mode = base_url.rstrip("/"), model, mode
        self.name = f"{model}@{self.base_url}"
        self.api_key = os.environ.get(api_key_env, "")
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self.max_concurrency, self.max_retries = max(1, max_concurrency), max_retries
        self.timeout_s, self.backoff_s, self.system_prompt = timeout_s, backoff_s, system_prompt
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _body(self, prompt: str, max_tokens: int, temperature: float, n: int, stop: Sequence[str],
              top_logprobs: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "n": n}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        if self.mode == "chat":
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            body["messages"] = messages + [{"role": "user", "content": prompt}]
            if top_logprobs:
                body.update(logprobs=True, top_logprobs=top_logprobs)
        else:
            body["prompt"] = prompt
            if top_logprobs:
                body["logprobs"] = top_logprobs
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{'chat/completions' if self.mode == 'chat' else 'completions'}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                self._count("requests")
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in RETRY_STATUS:
                    raise LmstackError(f"{url}: HTTP {e.code}: {detail}") from None
                last = LmstackError(f"{url}: HTTP {e.code} after {attempt + 1} attempts: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = LmstackError(f"{url}: {getattr(e, 'reason', e)} after {attempt + 1} attempts")
            except json.JSONDecodeError:
                last = LmstackError(f"{url}: the reply is not JSON")
        raise last  # type: ignore[misc]

    def _parse(self, reply: dict[str, Any]) -> list[Completion]:
        out = []
        for choice in reply.get("choices") or []:
            tops = None
            lp = choice.get("logprobs")
            if self.mode == "chat":
                text = (choice.get("message") or {}).get("content") or ""
                if lp and lp.get("content"):
                    tops = [{t["token"]: float(t["logprob"]) for t in (pos.get("top_logprobs") or [])}
                            or {pos["token"]: float(pos["logprob"])} for pos in lp["content"]]
            else:
                text = choice.get("text") or ""
                if lp and lp.get("top_logprobs"):
                    tops = [{k: float(v) for k, v in pos.items()} for pos in lp["top_logprobs"]]
            out.append(Completion(text, tops, choice.get("finish_reason")))
        if not out:
            raise LmstackError(f"{self.base_url}: reply without choices: {json.dumps(reply)[:200]}")
        return out

    def request(self, body: dict[str, Any]) -> list[Completion]:
        """Send one OpenAI request body as it is (a chat conversation stays a list of messages), through the
        cache, the retries and the reply parsing :meth:`complete` uses; its choices as completions."""
        if self.cache:
            hit = self.cache.get(body)
            if hit is not None:
                self._count("cache_hits")
                return self._parse(hit)
        reply = self._post(body)
        comps = self._parse(reply)  # parse before caching, so a malformed reply is never stored
        if self.cache:
            self.cache.put(body, reply)
        return comps

    def complete(self, prompts: Sequence[str], *, max_tokens: int = 256, temperature: float = 0.0, n: int = 1,
                 stop: Sequence[str] = (), top_logprobs: int = 0, seed: int | None = None) -> list[list[Completion]]:
        bodies = [self._body(p, max_tokens, temperature, n, stop, top_logprobs, seed) for p in prompts]
        if self.max_concurrency == 1 or len(bodies) == 1:
            return [self.request(b) for b in bodies]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self.request, bodies))


def load_llm(spec: str, **options: Any) -> LLM:
    """An ``LLM`` from a string: ``http(s)://host/v1#model`` (OpenAI-compatible) or a run / model folder."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise ConfigError(f"{spec}: name the model after '#', e.g. http://localhost:8000/v1#my-model")
        return OpenAICompatible(url, model, **options)
    from lmstack.infer.text import load_run

    model, tok = load_run(spec)
    return LocalLLM(model, tok, name=str(spec), **options)
