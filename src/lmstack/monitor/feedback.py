"""Feedback in, alignment data out: payload checks, and the store's judgements as DPO pairs and KTO labels.

    fb = parse_feedback({"interaction_id": id_, "kind": "thumb", "value": 1})   # a bad field: FieldError
    store.add_feedback(fb)
    write_alignment_data(store, dpo="pairs.jsonl", kto="kto.jsonl")   # what lmstack align dpo|kto train on

Pairs (``{"prompt", "chosen", "rejected"}``, :func:`lmstack.align.data.row_to_pair`'s pairwise form) come from

- pairwise choices: per pair of interactions, the net of its votes (+1 for the one preferred, ties and an even
  split give nothing);
- thumbs: per interaction the sum of its thumbs (up +1, down -1); an interaction with a positive sum and one
  with a negative sum answering the same prompt make a pair (every such up/down combination, once).

A named ``user``'s latest thumb on an interaction (or choice on a pair) replaces their earlier ones, so a
changed mind counts once; feedback without a user all counts.

KTO rows (``{"prompt", "completion", "label"}``, :func:`lmstack.align.data.row_to_unpaired`'s form) are the
thumbed interactions: a positive sum is desirable (``true``), a negative one undesirable. A pairwise choice
says which answer is better, not whether either is good, so it gives no KTO label.

The prompt is the request's chat ``messages`` when it carried them (the conversation the reply answers),
else ``input``. Rows whose two answers are the same text are left out (they teach nothing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from lmstack.errors import LmstackError
from lmstack.monitor.store import Feedback, FieldError, Interaction, validate_feedback

PAYLOAD_FIELDS = ("interaction_id", "kind", "value", "text", "other_id", "user")
MAX_TEXT = 10_000   # characters of a comment (or user name) a payload may carry
CHAT_ROLES = ("system", "user", "assistant")   # what align's readers take; other requests fall back to the input


def parse_feedback(payload: Any) -> Feedback:
    """The :class:`Feedback` of a JSON payload (the body of ``POST /v1/feedback``); a missing, unknown or
    malformed field is a :class:`FieldError` naming it. The store stamps the time."""
    if not isinstance(payload, Mapping):
        raise FieldError(f"feedback: expected a JSON object with {list(PAYLOAD_FIELDS)}, got "
                         f"{type(payload).__name__}")
    unknown = sorted(set(payload) - set(PAYLOAD_FIELDS))
    if unknown:
        raise FieldError(f"feedback: unknown field {unknown[0]!r}; the fields are {list(PAYLOAD_FIELDS)}", unknown[0])
    for name in ("interaction_id", "kind"):
        if name not in payload:
            raise FieldError(f"feedback: '{name}' is required", name)
    value = payload.get("value")
    if isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
        raise FieldError(f"feedback: 'value' must be a number, got {value!r:.40}", "value")
    for name in ("text", "user"):
        got = payload.get(name)
        if isinstance(got, str) and len(got) > MAX_TEXT:
            raise FieldError(f"feedback: '{name}' is longer than {MAX_TEXT} characters ({len(got)})", name)
    fb = Feedback(interaction_id=payload["interaction_id"], kind=payload["kind"], value=value,
                  text=payload.get("text"), other_id=payload.get("other_id"), user=payload.get("user"))
    validate_feedback(fb)
    if fb.kind == "thumb" and fb.text is not None and not fb.text.strip():
        fb.text = None
    return fb


def _text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts joined; None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def prompt_of(row: Interaction) -> str | list[dict[str, str]]:
    """What the reply answered: the request's chat messages (system/user/assistant, text content) when it had
    them, else the input text."""
    msgs = row.request.get("messages") if isinstance(row.request, dict) else None
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and m.get("role") in CHAT_ROLES
                                               and _text(m.get("content")) is not None for m in msgs):
        out = [{"role": m["role"], "content": _text(m["content"])} for m in msgs]
        if out[-1]["role"] != "assistant":
            return out
    return row.input


def _key(prompt: str | list[dict[str, str]]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class _Judged:
    """The store's feedback, gathered once: thumb sums, pairwise nets and the interactions they name."""

    def __init__(self, store: Any, since: float | None, model: str | None):
        self.store = store
        self.rows: dict[str, Interaction] = {}
        self.thumbs: dict[str, float] = {}
        self.pairs: dict[tuple[str, str], float] = {}
        # a named user's latest judgement of a thing replaces their earlier one (a changed mind counts once);
        # anonymous ones all count
        votes: dict[tuple[Any, ...], float] = {}
        for n, fb in enumerate(store.feedback(since=since)):
            who = fb.user if fb.user is not None else n
            if fb.kind == "thumb":
                votes[("thumb", fb.interaction_id, who)] = fb.value
            elif fb.kind == "pairwise":
                a, b = sorted((fb.interaction_id, fb.other_id))
                sign = 1.0 if a == fb.interaction_id else -1.0   # positive: a preferred
                votes[("pair", (a, b), who)] = sign * fb.value
        for (kind, what, _), v in votes.items():
            table = self.thumbs if kind == "thumb" else self.pairs
            table[what] = table.get(what, 0.0) + v
        wanted = set(self.thumbs) | {i for p in self.pairs for i in p}
        for i in sorted(wanted):
            try:
                row = store.get(i)
            except LmstackError:   # pruned since the feedback was read
                continue
            if model is None or row.model == model:
                self.rows[i] = row

    def order(self, ids: tuple[str, ...]) -> tuple[float, tuple[str, ...]]:
        return (max(self.rows[i].time for i in ids), ids)


def preference_pairs(store: Any, since: float | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """DPO rows from pairwise choices, then from thumbs (see the module docstring), each once, in the order of
    their later interaction's time. ``since``: feedback given from then on; ``model``: both answers by it."""
    j = _Judged(store, since, model)
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()

    def add(chosen: Interaction, rejected: Interaction, source: str) -> None:
        prompt = prompt_of(chosen)
        k = (_key(prompt), chosen.output, rejected.output)
        if chosen.output.strip() == rejected.output.strip() or k in seen or not chosen.output.strip() \
                or not rejected.output.strip():
            return
        seen.add(k)
        out.append({"prompt": prompt, "chosen": chosen.output, "rejected": rejected.output,
                    "chosen_id": chosen.id, "rejected_id": rejected.id, "source": source})

    decided = [(ab, net) for ab, net in j.pairs.items() if net and ab[0] in j.rows and ab[1] in j.rows]
    for (a, b), net in sorted(decided, key=lambda kv: j.order(kv[0])):
        win, lose = (a, b) if net > 0 else (b, a)
        add(j.rows[win], j.rows[lose], "pairwise")
    by_prompt: dict[str, tuple[list[Interaction], list[Interaction]]] = {}
    for i, s in j.thumbs.items():
        if i in j.rows and s:
            up, down = by_prompt.setdefault(_key(prompt_of(j.rows[i])), ([], []))
            (up if s > 0 else down).append(j.rows[i])
    combos = [(u, d) for up, down in by_prompt.values() for u in up for d in down]
    for u, d in sorted(combos, key=lambda ud: j.order((ud[0].id, ud[1].id))):
        add(u, d, "thumbs")
    return out


def kto_rows(store: Any, since: float | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """KTO rows of the thumbed interactions (a positive thumb sum desirable, a negative one not), in time order."""
    j = _Judged(store, since, model)
    picked = sorted((j.rows[i] for i, s in j.thumbs.items() if s and i in j.rows and j.rows[i].output.strip()),
                    key=lambda r: (r.time, r.id))
    return [{"prompt": prompt_of(r), "completion": r.output, "label": j.thumbs[r.id] > 0, "id": r.id}
            for r in picked]


def write_alignment_data(store: Any, dpo: str | os.PathLike | None = None, kto: str | os.PathLike | None = None,
                         since: float | None = None, model: str | None = None) -> dict[str, int]:
    """Write the DPO pairs and/or KTO rows as JSONL (atomically), the files ``lmstack align dpo|kto`` read
    (``data.train``); returns how many rows each got."""
    from lmstack.runs import atomic_write_jsonl

    if dpo is None and kto is None:
        raise LmstackError("feedback export: give a DPO output path, a KTO output path, or both")
    counts = {}
    if dpo is not None:
        counts["dpo"] = atomic_write_jsonl(dpo, preference_pairs(store, since, model))
    if kto is not None:
        counts["kto"] = atomic_write_jsonl(kto, kto_rows(store, since, model))
    return counts
