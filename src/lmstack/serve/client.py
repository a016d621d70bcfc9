"""A small streaming client for any OpenAI-compatible server (``lmstack serve``, vLLM, OpenAI): what
``lmstack chat --url`` talks through. Standard library only (urllib), so the CLI needs no extra.

    for delta in stream_chat("http://127.0.0.1:8000", messages, {"max_tokens": 64}):
        print(delta, end="")

Errors: an unreachable server or an error body becomes one :class:`LmstackError` line with the server's
message (e.g. the context length is exceeded), so a chat session can report it and go on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lmstack.errors import LmstackError


def _api(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _open(url: str, body: Mapping[str, Any] | None, api_key: str | None, timeout: float) -> Any:
    headers = {"content-type": "application/json", "accept": "text/event-stream, application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise LmstackError(f"{url}: {e.code} {msg}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise LmstackError(f"{url}: cannot reach the server ({reason}); is `lmstack serve` running there?") from None


def list_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[str]:
    """The model ids a server offers (``GET /v1/models``)."""
    with _open(_api(url) + "/models", None, api_key, timeout) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


def stream_chat(url: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None,
                model: str | None = None, api_key: str | None = None, timeout: float = 300.0) -> Iterator[str]:
    """The reply to ``messages``, streamed as text deltas (``POST /v1/chat/completions`` with ``stream``)."""
    model = model or list_models(url, api_key)[0]
    body = {**(params or {}), "model": model, "messages": list(messages), "stream": True}
    with _open(_api(url) + "/chat/completions", body, api_key, timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise LmstackError(f"{url}: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    yield delta["content"]
                if delta.get("tool_calls"):
                    yield json.dumps(delta["tool_calls"])
