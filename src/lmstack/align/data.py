"""Preference data: rows -> (prompt messages, chosen, rejected) or (prompt, completion, label) -> token batches.

Row forms (JSONL, JSON list or Parquet, read by the one row reader :func:`lmstack.sources.iter_rows`):

- pairwise: ``{"prompt", "chosen", "rejected"}``; ``prompt`` a string or a list of messages, ``chosen`` /
  ``rejected`` strings (or a message dict / a list of messages whose last one is the reply);
- HH-RLHF: ``{"chosen", "rejected"}`` with no prompt, each a whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  dialogue; they share every turn but the last, so the prompt is the shared turns and each response is
  its last assistant turn;
- ShareGPT (LLaMA-Factory): ``{"conversations": [{"from", "value"}...], "chosen": {"from": "gpt", "value"},
  "rejected": {...}}``;
- unpaired (KTO): ``{"prompt", "completion", "label"}`` or ``{"messages": [..., assistant], "label"}``
  (the last assistant message is the completion), ``label`` true for desirable, false for undesirable.

Rendering is the fine-tuning layer's (:func:`lmstack.finetune.sft.encode_messages`, the chat template)
with ``last_turn_only``: the loss (and every log-prob an alignment loss reads) covers the response's
tokens and its closing ``<|end|>`` only. Rows that cannot teach a preference are skipped and counted:
identical chosen and rejected, an empty response, a prompt that leaves no room for the response within
``max_len``; one summary line reports them, and a file with no usable row is a :class:`DataError` naming
the field.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.errors import DataError
from lmstack.finetune.sft import ROLE_ALIASES, Example, Messages, SFTLoader, collate, encode_messages

IGNORE = -100
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    """One preference: the conversation so far, the preferred reply and the dispreferred one."""

    prompt: Messages
    chosen: str
    rejected: str
    where: str = ""


@dataclass
class Unpaired:
    """One KTO example: a conversation, a reply, and whether the reply is desirable."""

    prompt: Messages
    completion: str
    label: bool
    where: str = ""


# ----------------------------------------------------------------------------------------------------
# rows -> pairs


def split_hh_dialogue(text: str, where: str = "row") -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"user", a}, {"assistant", b}]`` (HH-RLHF's format)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: 'chosen'/'rejected' without a 'prompt' must be HH-RLHF dialogues "
                        f"('\\n\\nHuman: ...\\n\\nAssistant: ...'); got {text[:60]!r}")
    roles, contents = parts[1::2], parts[2::2]
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(roles, contents)]


def hh_pair(chosen: str, rejected: str, where: str = "row") -> Pair:
    """An HH-RLHF pair: the prompt is the dialogues' common prefix up to its last ``"\n\nAssistant:"``, each
    response what follows (a reply may itself contain ``"Human:"``-like text, so only the shared part is
    split into turns)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind("\n\nAssistant:", 0, n)
    if cut < 0:
        raise DataError(f"{where}: the chosen and rejected dialogues differ before their last turn; "
                        f"HH-RLHF pairs share every turn but the last")
    head = len("\n\nAssistant:")
    prompt = split_hh_dialogue(chosen[:cut] + "\n\nAssistant: x", where)[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: an HH-RLHF dialogue must end with a Human turn then an Assistant reply")
    return Pair(prompt, chosen[cut + head:].strip(), rejected[cut + head:].strip(), where)


def _messages(turns: Any, where: str, name: str) -> Messages:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{name}' must be a string, a message or a list of messages")
    out: Messages = []
    for k, t in enumerate(turns):
        role = t.get("role", t.get("from")) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise DataError(f"{where}: '{name}' message {k} needs a role (system/user/assistant) and a string "
                            f"content, got {t!r:.80}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def _reply(value: Any, where: str, name: str) -> tuple[Messages, str]:
    """(messages before the reply, reply text) of a chosen/rejected field."""
    if isinstance(value, str):
        return [], value
    msgs = _messages(value, where, name)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{name}' must end with an assistant message")
    return msgs[:-1], msgs[-1]["content"]


def _prompt(row: dict[str, Any], where: str) -> Messages:
    msgs: Messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        msgs.append({"role": "system", "content": row["system"]})
    if "conversations" in row or "messages" in row:
        msgs += _messages(row.get("conversations", row.get("messages")), where, "conversations")
    elif "prompt" in row:
        p = row["prompt"]
        msgs += [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, where, "prompt")
    return msgs


def row_to_pair(row: Any, where: str = "row") -> Pair:
    """The :class:`Pair` of one pairwise, HH-RLHF or ShareGPT row (see the module docstring)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (with 'prompt' or "
                        f"'conversations', or HH-RLHF dialogues); this one has keys {sorted(row)}")
    prompt = _prompt(row, where)
    chosen, rejected = row["chosen"], row["rejected"]
    if not prompt and isinstance(chosen, str) and isinstance(rejected, str):
        return hh_pair(chosen, rejected, where)
    pre_c, chosen_text = _reply(chosen, where, "chosen")
    pre_r, rejected_text = _reply(rejected, where, "rejected")
    if pre_c != pre_r:
        raise DataError(f"{where}: 'chosen' and 'rejected' carry different conversations before the reply")
    prompt = prompt + pre_c
    if not prompt:
        raise DataError(f"{where}: the pair has no prompt ('prompt' or 'conversations')")
    return Pair(prompt, chosen_text, rejected_text, where)


def row_to_unpaired(row: Any, where: str = "row") -> Unpaired:
    """The :class:`Unpaired` example of a ``prompt``/``completion``/``label`` or ``messages``/``label`` row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r:.40}; "
                        f"keys {sorted(row)}")
    if "completion" in row:
        prompt, completion = _prompt(row, where), row["completion"]
        if not isinstance(completion, str):
            prompt_extra, completion = _reply(completion, where, "completion")
            prompt += prompt_extra
    elif "messages" in row:
        msgs = _messages(row["messages"], where, "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must end with the assistant message being labelled")
        prompt, completion = msgs[:-1], msgs[-1]["content"]
    else:
        raise DataError(f"{where}: an unpaired row needs 'completion' (with 'prompt') or 'messages', plus "
                        f"'label'; this one has keys {sorted(row)}")
    if not prompt:
        raise DataError(f"{where}: the example has no prompt")
    return Unpaired(prompt, completion, label, where)


# ----------------------------------------------------------------------------------------------------
# encoding


@dataclass
class PairExample:
    """A tokenized pair: the chosen and the rejected conversation, each an SFT :class:`Example`."""

    chosen: Example
    rejected: Example
    where: str = ""

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class UnpairedExample:
    """A tokenized KTO example; ``kl`` is its mismatched pair (this prompt, another example's completion),
    set by :func:`lmstack.align.kto.attach_kl` for the KL estimate."""

    example: Example
    label: bool
    where: str = ""
    kl: Example | None = None

    def __len__(self) -> int:
        return len(self.example)


BAD_KINDS = ("identical", "empty_response", "prompt_too_long")


def _encode_reply(tokenizer: Any, prompt: Messages, reply: str, max_len: int, where: str) -> Example | None:
    """None when the prompt leaves no response token within ``max_len`` (truncation cut it all)."""
    return encode_messages(tokenizer, [*prompt, {"role": "assistant", "content": reply}], max_len, where,
                           last_turn_only=True)


def encode_pair(tokenizer: Any, pair: Pair, max_len: int) -> PairExample | str:
    """The tokenized pair, or why it is skipped (one of :data:`BAD_KINDS`)."""
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "empty_response"
    if pair.chosen.strip() == pair.rejected.strip():
        return "identical"
    c = _encode_reply(tokenizer, pair.prompt, pair.chosen, max_len, pair.where)
    r = _encode_reply(tokenizer, pair.prompt, pair.rejected, max_len, pair.where)
    if c is None or r is None:
        return "prompt_too_long"
    return PairExample(c, r, pair.where)


def encode_unpaired(tokenizer: Any, ex: Unpaired, max_len: int) -> UnpairedExample | str:
    if not ex.completion.strip():
        return "empty_response"
    e = _encode_reply(tokenizer, ex.prompt, ex.completion, max_len, ex.where)
    return "prompt_too_long" if e is None else UnpairedExample(e, ex.label, ex.where)


def _report_skips(kind: str, stats: dict[str, int], paths: Any) -> None:
    bad = {k: stats[k] for k in BAD_KINDS if stats.get(k)}
    if bad:
        print(f"[align] {kind} data: skipped {sum(bad.values())} of {stats['rows']} rows ("
              + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in bad.items()) + ")", file=sys.stderr)


def _no_usable(kind: str, paths: Any, stats: dict[str, int], max_len: int) -> DataError:
    reasons = {"identical": "'chosen' equals 'rejected'", "empty_response": "the response ('chosen'/'rejected'/"
               "'completion') is empty", "prompt_too_long": f"the prompt leaves no room for the response in "
               f"data.max_len={max_len} tokens (raise data.max_len)"}
    worst = max(BAD_KINDS, key=lambda k: stats.get(k, 0))
    why = reasons[worst] if stats.get(worst) else "the files hold no rows"
    return DataError(f"{paths}: no usable {kind} rows of {stats['rows']}: {why}")


def load_pairs(paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: Any, max_len: int,
               limit: int | None = None, rows: Sequence[dict[str, Any]] | None = None
               ) -> tuple[list[PairExample], dict[str, int]]:
    """Tokenized pairs of every row of ``paths`` (or of ``rows`` given in memory); stats count the skips."""
    from lmstack.sources import iter_rows

    source = (((f"row {i + 1}", r) for i, r in enumerate(rows)) if rows is not None else iter_rows(paths))
    out: list[PairExample] = []
    stats = {"rows": 0, **{k: 0 for k in BAD_KINDS}, "truncated": 0}
    for where, row in source:
        if limit is not None and stats["rows"] >= limit:
            break
        stats["rows"] += 1
        got = encode_pair(tokenizer, row_to_pair(row, where), max_len)
        if isinstance(got, str):
            stats[got] += 1
            continue
        stats["truncated"] += int(len(got) == max_len)
        out.append(got)
    _report_skips("preference", stats, paths)
    if not out:
        raise _no_usable("preference", paths if rows is None else "rows", stats, max_len)
    stats["pairs"] = len(out)
    return out, stats


def load_unpaired(paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: Any, max_len: int,
                  limit: int | None = None, rows: Sequence[dict[str, Any]] | None = None
                  ) -> tuple[list[UnpairedExample], dict[str, int]]:
    """Tokenized KTO examples; a pairwise row gives two (chosen desirable, rejected undesirable)."""
    from lmstack.sources import iter_rows

    source = (((f"row {i + 1}", r) for i, r in enumerate(rows)) if rows is not None else iter_rows(paths))
    out: list[UnpairedExample] = []
    stats = {"rows": 0, **{k: 0 for k in BAD_KINDS}, "truncated": 0}
    for where, row in source:
        if limit is not None and stats["rows"] >= limit:
            break
        stats["rows"] += 1
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            p = row_to_pair(row, where)
            items = [Unpaired(p.prompt, p.chosen, True, where), Unpaired(p.prompt, p.rejected, False, where)]
        else:
            items = [row_to_unpaired(row, where)]
        for item in items:
            got = encode_unpaired(tokenizer, item, max_len)
            if isinstance(got, str):
                stats[got] += 1
                continue
            stats["truncated"] += int(len(got) == max_len)
            out.append(got)
    _report_skips("unpaired", stats, paths)
    if not out:
        raise _no_usable("unpaired", paths if rows is None else "rows", stats, max_len)
    stats["examples"] = len(out)
    stats["desirable"] = sum(e.label for e in out)
    return out, stats


def split_heldout(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) by a stable hash of each item's token ids, as the SFT split does."""
    from lmstack.data.split import is_heldout

    train, held = [], []
    for it in items:
        ids = it.chosen.input_ids if isinstance(it, PairExample) else it.example.input_ids
        (held if is_heldout(str(ids), fraction, seed) else train).append(it)
    if not held:
        held, train = train[-1:], train[:-1]
    if not train:
        raise DataError("too few preference examples to hold some out; add data or lower data.valid_fraction")
    return train, held


# ----------------------------------------------------------------------------------------------------
# batches


def collate_pairs(pairs: Sequence[PairExample], pad_id: int = 0,
                  ref: Sequence[tuple[float, float]] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, torch.Tensor]]:
    """One (2B, T) batch, chosen rows first then rejected (one forward scores both), right-padded.

    ``x = {"input_ids"}`` (+ ``"ref_logps"`` (2B,) when the reference log-probs were cached),
    ``y = {"labels"}`` with -100 off the responses.
    """
    x, y = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    xs: dict[str, torch.Tensor] = {"input_ids": x}
    if ref is not None:
        xs["ref_logps"] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref], dtype=torch.float32)
    return xs, {"labels": y}


def collate_unpaired(items: Sequence[UnpairedExample], pad_id: int = 0,
                     ref: Sequence[tuple[float, float]] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, torch.Tensor]]:
    """KTO batch: the B examples, then their B mismatched KL pairs (``item.kl``); ``x["label"]`` (B,) bool."""
    if any(it.kl is None for it in items):
        raise DataError("KTO examples need their mismatched KL pairs: call lmstack.align.kto.attach_kl first")
    x, y = collate([it.example for it in items] + [it.kl for it in items], pad_id)  # type: ignore[misc]
    xs: dict[str, torch.Tensor] = {"input_ids": x, "label": torch.tensor([it.label for it in items])}
    if ref is not None:
        xs["ref_logps"] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref], dtype=torch.float32)
    return xs, {"labels": y}


class PairLoader(SFTLoader):
    """The SFT loader's length-grouped, resumable order over pairs (or unpaired examples), collated as
    :func:`collate_pairs` / :func:`collate_unpaired`; ``ref`` holds cached reference log-probs per item."""

    def __init__(self, items: list, batch_size: int, pad_id: int = 0, seed: int = 0,
                 ref: list[tuple[float, float]] | None = None, group: int = 50):
        super().__init__(items, batch_size, pad_id, seed, group)
        self.ref = ref

    def next_batch(self):  # type: ignore[override]
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        idx = self._order[self.pos]
        self.pos += 1
        return batch_of(self.examples, idx, self.pad_id, self.ref)


def batch_of(items: list, idx: Sequence[int], pad_id: int = 0, ref: list[tuple[float, float]] | None = None):
    chosen = [items[i] for i in idx]
    refs = [ref[i] for i in idx] if ref is not None else None
    if isinstance(chosen[0], PairExample):
        return collate_pairs(chosen, pad_id, refs)
    return collate_unpaired(chosen, pad_id, refs)


def fixed_batches(items: list, batch_size: int, pad_id: int = 0, ref: list[tuple[float, float]] | None = None):
    """Length-sorted batches over all ``items`` in a fixed order (held-out scoring, reference caching);
    yields ``(indices, (x, y))``."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        yield idx, batch_of(items, idx, pad_id, ref)


def shuffled(items: list, seed: int) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
