"""The chat template: messages -> token ids and a loss mask.

Format (special tokens in angle brackets, nothing between a marker and the content)::

    <|bos|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

- one ``<|role|> content <|end|>`` block per message, roles ``system``, ``user``, ``assistant``;
- ``<|bos|>`` first when the tokenizer has a BOS token;
- ``add_generation_prompt=True`` appends ``<|assistant|>``: the model writes the reply and ends it with
  ``<|end|>``, which is where generation stops;
- loss mask: 1 on the ids of assistant content and on the ``<|end|>`` that closes an assistant message
  (the model must learn to stop), 0 on everything else (bos, role markers, system and user text).

Content is encoded as plain text: a user typing ``<|end|>`` gets ordinary bytes, never the marker.
``render_chat_text`` gives the same conversation as a string; ``tokenizer.encode(text,
allowed_special="all")`` of it returns the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lmstack.errors import LmstackError
from lmstack.tokenizer.base import CHAT_ROLES, Tokenizer

END_OF_TURN = "<|end|>"   # ends every message; generation stops here (lmstack.infer imports it)


def _marker(role: str) -> str:
    return f"<|{role}|>"


def _check(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise LmstackError("chat messages must be a list of {'role', 'content'} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise LmstackError(f"chat message {k}: expected a dict with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise LmstackError(f"chat message {k}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise LmstackError(f"chat message {k}: content must be a string")


def _marker_ids(tokenizer: Tokenizer) -> dict[str, int]:
    needed = [*(_marker(r) for r in CHAT_ROLES), END_OF_TURN]
    missing = [s for s in needed if s not in tokenizer.special_tokens]
    if missing:
        raise LmstackError(f"the tokenizer has no chat special tokens {', '.join(missing)}; train it with "
                           f"lmstack's default special tokens")
    return {s: tokenizer.special_tokens[s] for s in needed}


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of a conversation, same length; mask 1 on what the assistant says."""
    _check(messages)
    marks = _marker_ids(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(0)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    for m, body in zip(messages, contents):
        learn = int(m["role"] == "assistant")
        ids.append(marks[_marker(m["role"])])
        mask.append(0)
        ids.extend(body)
        ids.append(marks[END_OF_TURN])
        mask.extend([learn] * (len(body) + 1))
    if add_generation_prompt:
        ids.append(marks[_marker("assistant")])
        mask.append(0)
    return ids, mask


def render_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                     bos: str | None = "<|bos|>") -> str:
    """The conversation as a string in the template's format (for display and for checks)."""
    _check(messages)
    text = (bos or "") + "".join(f"{_marker(m['role'])}{m['content']}{END_OF_TURN}" for m in messages)
    return text + (_marker("assistant") if add_generation_prompt else "")
