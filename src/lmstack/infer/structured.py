"""JSON output checked against a schema: for local models (constrained, :mod:`lmstack.infer.constrain`) and for
remote ones, which cannot be constrained, so they are validated and asked again.

    from lmstack.infer.structured import validate_json, generate_json, parse_completion
    obj = validate_json('{"a": 1}', schema)                   # the parsed value, or StructuredOutputError
    obj = generate_json(call, schema, max_retries=2)          # call(messages) -> text, e.g. a remote client
    obj = parse_completion(complete(model, tok, prompt, GenerationConfig(json_schema=schema)), schema)

:func:`generate_json` is the bounded repair loop: the first reply is parsed and validated with
``jsonschema``; on failure the conversation gets the reply and the validation error back ("fix it, reply
with JSON only") and the model is asked again, at most ``max_retries`` more times; the last error is raised
when no reply validates. No invalid value is ever returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import LmstackError

Messages = list[dict[str, str]]


class StructuredOutputError(LmstackError):
    """A reply that is not JSON, or not valid under the schema (after every allowed retry)."""

    def __init__(self, message: str, attempts: list[Attempt] | None = None):
        super().__init__(message)
        self.attempts = attempts or []


@dataclass
class Attempt:
    text: str
    error: str | None          # None: it validated


def _one_line(text: str, limit: int = 300) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit - 3] + "..."


def extract_json(text: str) -> str:
    """The JSON in a reply: the text itself, else the inside of a ```json fence, else the outermost {...}/[...]."""
    stripped = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", stripped, re.DOTALL)
    if fence:
        return fence.group(1).strip()
    if stripped[:1] in "{[" or not stripped:
        return stripped
    starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
    if not starts:
        return stripped
    start = min(starts)
    end = max(stripped.rfind("}"), stripped.rfind("]"))
    return stripped[start:end + 1] if end > start else stripped[start:]


def validate_json(text: str, schema: Mapping[str, Any], *, extract: bool = True) -> Any:
    """The value ``text`` holds, when it parses and is valid under ``schema``; else a one-line
    :class:`StructuredOutputError` saying where (the JSON error, or the failing keyword and path)."""
    from lmstack.extras import require
    from lmstack.infer.constrain import check_json_schema

    check_json_schema(dict(schema))
    jsonschema = require("jsonschema", "JSON Schema validation")
    raw = extract_json(text) if extract else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise StructuredOutputError(f"invalid at {where}: {_one_line(error.message)} "
                                    f"(keyword {error.validator!r})")
    return value


def is_valid_json(text: str, schema: Mapping[str, Any]) -> bool:
    try:
        validate_json(text, schema, extract=False)
    except StructuredOutputError:
        return False
    return True


REPAIR_PROMPT = ("Your reply is not valid: {error}. Reply again with only the corrected JSON value, valid under "
                 "this JSON Schema:\n{schema}")
FORMAT_PROMPT = "Reply with only a JSON value valid under this JSON Schema:\n{schema}"


@dataclass
class JsonResult:
    value: Any
    attempts: list[Attempt] = field(default_factory=list)


def generate_json(call: Callable[[Messages], str], schema: Mapping[str, Any], max_retries: int = 2, *,
                  messages: Sequence[Mapping[str, str]] | str = (), add_schema: bool = True,
                  return_attempts: bool = False) -> Any:
    """Ask ``call`` (messages -> reply text: a remote chat client, a local chat, a test stub) for JSON valid
    under ``schema``; a reply that fails is sent back with its validation error, at most ``max_retries``
    times. Returns the value (or a :class:`JsonResult` with every attempt when ``return_attempts``); raises
    :class:`StructuredOutputError` (with ``.attempts``) when no reply validates.

    ``messages``: the conversation so far (a string is one user message); ``add_schema`` appends the schema
    to it as a format instruction."""
    if not isinstance(max_retries, int) or max_retries < 0:
        raise LmstackError(f"max_retries: must be an integer >= 0, got {max_retries!r}")
    from lmstack.infer.constrain import check_json_schema

    check_json_schema(dict(schema))
    schema_text = json.dumps(schema, separators=(",", ":"))
    convo: Messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else \
        [dict(m) for m in messages]
    if add_schema:
        instruction = FORMAT_PROMPT.format(schema=schema_text)
        if convo and convo[-1].get("role") == "user":
            convo[-1]["content"] = f"{convo[-1]['content']}\n\n{instruction}"
        else:
            convo.append({"role": "user", "content": instruction})
    attempts: list[Attempt] = []
    for _ in range(max_retries + 1):
        reply = call([dict(m) for m in convo])
        if not isinstance(reply, str):
            raise LmstackError(f"generate_json: call must return the reply text, got {type(reply).__name__}")
        try:
            value = validate_json(reply, schema)
        except StructuredOutputError as e:
            attempts.append(Attempt(reply, str(e)))
            convo += [{"role": "assistant", "content": reply},
                      {"role": "user", "content": REPAIR_PROMPT.format(error=e, schema=schema_text)}]
            continue
        attempts.append(Attempt(reply, None))
        return JsonResult(value, attempts) if return_attempts else value
    raise StructuredOutputError(f"no valid JSON after {len(attempts)} attempt(s); last: {attempts[-1].error}",
                                attempts)


def parse_completion(completion: Any, schema: Mapping[str, Any]) -> Any:
    """The value of a constrained local completion (:class:`lmstack.infer.text.Completion`): one that ran out
    of ``max_new_tokens`` (finish reason ``length``) is incomplete and refused, never reported as valid."""
    if completion.finish_reason != "stop":
        raise StructuredOutputError(f"the output stopped at max_new_tokens ({completion.n_tokens} tokens) before "
                                    f"the JSON was complete (finish_reason {completion.finish_reason!r}); raise "
                                    f"max_new_tokens")
    return validate_json(completion.text, schema, extract=False)
