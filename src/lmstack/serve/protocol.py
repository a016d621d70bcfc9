"""The OpenAI request and response shapes: parameter checks, tool calls and log-probs (no HTTP here).

Every check raises :class:`ApiError` with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``
naming the field. Tool calls go through the constrained decoder: with ``tool_choice`` ``"required"`` or a
named function the reply is decoded under the JSON Schema ``{"name": <one of the tools>, "arguments": <its
parameters>}`` (:func:`tool_call_schema`), so it always parses; with ``"auto"`` the model writes freely and a
reply that is a call (a bare JSON object, or Hermes-style ``<tool_call>{...}</tool_call>``, which the Qwen and
Hermes templates ask for) is returned as ``tool_calls`` (:func:`parse_tool_calls`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Request fields this server does not implement: a value other than these defaults is refused (400) rather
# than silently ignored.
UNSUPPORTED = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False)}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param, "invalid_parameter")


def number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"must be a number, got {v!r}")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def integer(body: Mapping[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rule = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(name, f"must be an integer {rule}, got {v!r}")
    return v


def stops(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 4:
        raise bad("stop", f"must be a non-empty string or a list of at most 4, got {v!r}")
    return items


def json_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
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
            raise bad("response_format", "json_schema needs {\"name\": ..., \"schema\": {...}}")
        return schema
    raise bad("response_format", f"type must be text, json_object or json_schema, got {kind!r}")


def _text_content(c: Any, where: str) -> str:
    if isinstance(c, list):   # content parts: only text parts are understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise bad(where, "only text content parts are supported")
        return "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise bad(where, f"must be a string, got {type(c).__name__}")
    return c


def messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation: system / user / assistant (optionally with ``tool_calls``) / tool messages."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of {role, content}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages[{i}]", "needs a role of system, user, assistant or tool")
        role = "system" if role == "developer" else role
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise bad(f"messages[{i}].tool_calls", "must be a list of {id, type, function: {name, arguments}}")
            content = "" if m.get("content") is None else _text_content(m["content"], f"messages[{i}].content")
            out.append({"role": role, "content": content, "tool_calls": calls})
            continue
        msg: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), f"messages[{i}].content")}
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        out.append(msg)
    return out


def prompt(body: Mapping[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        return p
    raise bad("prompt", "must be a string, one string in a list, or a list of token ids (batches of prompts "
                        "are not supported: send one request each)")


# ----- tools


@dataclass
class ToolUse:
    """The request's tools and how the reply may use them."""

    tools: list[dict[str, Any]] = field(default_factory=list)   # OpenAI's [{"type": "function", "function": {...}}]
    choice: str = "none"            # "none" | "auto" | "required" | "function" (one named function)
    name: str | None = None         # the function of choice "function"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def tool_use(body: Mapping[str, Any]) -> ToolUse:
    tools = body.get("tools")
    if tools is None or tools == []:
        choice = body.get("tool_choice")
        if choice not in (None, "none"):
            raise bad("tool_choice", "needs tools")
        return ToolUse()
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of {\"type\": \"function\", \"function\": {name, parameters}}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {name, parameters}}")
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"]):
            raise bad(f"tools[{i}].function.name", "must be 1-64 letters, digits, '_' or '-'")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON Schema object")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad("tools", "function names must be unique")
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise bad("tool_choice", f"names no tool of this request: {name!r} (tools: {', '.join(names)})")
        return ToolUse(tools, "function", name)
    if choice not in ("none", "auto", "required"):
        raise bad("tool_choice", f"must be none, auto, required or {{\"type\": \"function\", ...}}, got {choice!r}")
    return ToolUse(tools, choice)


def tool_call_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema of one call to one of the allowed tools: ``{"name": ..., "arguments": {...}}``."""
    allowed = [t for t in use.tools if use.choice != "function" or t["function"]["name"] == use.name]
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters", {"type": "object"})},
                "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """How lmstack's own chat template (which has no tool syntax) tells the model about tools."""
    specs = json.dumps([t["function"] for t in tools], separators=(",", ":"))
    return ("You can call these functions. To call one, reply with only a JSON object "
            "{\"name\": <function name>, \"arguments\": <arguments object>}.\nFunctions: " + specs)


def for_plain_template(msgs: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """A conversation with tools, tool calls and tool results in lmstack's own system/user/assistant roles."""
    out = [{"role": "system", "content": tools_system_prompt(tools)}] if tools else []
    for m in msgs:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Function result: {m['content']}"})
        elif m.get("tool_calls"):
            calls = [{"name": c["function"].get("name"), "arguments": _arguments(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def for_hf_template(msgs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call arguments as objects, which Hugging Face templates expect (OpenAI sends JSON strings)."""
    out = []
    for m in msgs:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"],
                                                        "arguments": _arguments(c["function"].get("arguments"))}}
                                     for c in m["tool_calls"]]}
        out.append(dict(m))
    return out


def _arguments(a: Any) -> Any:
    if isinstance(a, str):
        try:
            return json.loads(a)
        except json.JSONDecodeError:
            return a
    return a


_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, use: ToolUse) -> list[dict[str, Any]] | None:
    """The tool calls in a reply (OpenAI's ``tool_calls`` list), or None when it is not a call of a known tool."""
    if not use.tools or use.choice == "none":
        return None
    found = _TAGGED.findall(text) or [text.strip()]
    calls = []
    for blob in found:
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in use.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args)}})
    return calls


# ----- log-probs


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Sequence[tuple[int, float]]]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}``."""
    content = []
    for k, (tid, lp) in enumerate(zip(ids, logprobs)):
        text, raw = token_text(tokenizer, tid)
        alts = []
        for alt, alt_lp in (tops[k] if k < len(tops) else []):
            a_text, a_raw = token_text(tokenizer, alt)
            alts.append({"token": a_text, "logprob": alt_lp, "bytes": a_raw})
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float],
                        tops: Sequence[Sequence[tuple[int, float]]], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for tid in ids:
        offsets.append(offset)
        text, _ = token_text(tokenizer, tid)
        tokens.append(text)
        offset += len(text)
    top = [{token_text(tokenizer, a)[0]: lp for a, lp in (tops[k] if k < len(tops) else [])}
           for k in range(len(ids))]
    return {"tokens": tokens, "token_logprobs": list(logprobs[:len(ids)]), "top_logprobs": top,
            "text_offset": offsets}
