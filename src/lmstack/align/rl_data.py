"""Prompt-only data for online RL: items ``{"prompt": messages, "answer": ..., ...}`` and their prompt ids.

An *item* is one prompt row: ``prompt`` (chat messages, answered as the assistant), the reference ``answer``
(numeric tasks) or ``tests`` (code tasks), and for synthetic arithmetic a worked ``solution`` in the
reasoning template of :mod:`lmstack.align.rewards` (what the supervised warm-up trains on).

- :func:`arithmetic_items`: seeded synthetic arithmetic (``What is 12 + 7 - 3?``); the train / held-out
  side of a question is :func:`lmstack.data.split.is_heldout` of its text, so the split never depends on
  how many items are drawn or in which order;
- :func:`gsm8k_items`: GSM8K rows (``question``, ``answer`` ending ``#### N``) read with the one row reader
  (:func:`lmstack.sources.iter_rows`);
- :func:`row_items`: any JSONL/JSON/Parquet rows with ``prompt`` (or ``question``, or ``messages``) and
  ``answer`` / ``tests``.

Prompts are rendered with the chat template fine-tuning trains with (:func:`prompt_ids`: the tokens of the
conversation up to the assistant's turn, exactly the prefix :func:`lmstack.finetune.sft.encode_messages`
puts before an assistant reply), so a model fine-tuned with ``lmstack finetune`` sees the format it knows.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from lmstack.data.split import is_heldout
from lmstack.errors import DataError

Item = dict[str, Any]

OPS = ("+", "-", "*")


def _apply(value: int, op: str, t: int) -> int:
    return value + t if op == "+" else value - t if op == "-" else value * t


def _question_and_solution(terms: list[int], ops: list[str]) -> tuple[str, str, int]:
    expr = str(terms[0])
    value = terms[0]
    steps = []
    for op, t in zip(ops, terms[1:]):
        new = _apply(value, op, t)
        steps.append(f"{value} {op} {t} = {new}")
        value = new
        expr += f" {op} {t}"
    thought = ". ".join(steps) if len(steps) > 1 else steps[0]
    return f"What is {expr}?", f"<think>{thought}</think>\n#### {value}", value


def _in_range(terms: list[int], ops: list[str], max_value: int | None) -> bool:
    """Every running value (left to right) lies in ``0..max_value`` (no bound when None)."""
    if max_value is None:
        return True
    value = terms[0]
    for op, t in zip(ops, terms[1:]):
        value = _apply(value, op, t)
        if not 0 <= value <= max_value:
            return False
    return True


def _item(terms: list[int], ops: list[str], system: str) -> Item:
    q, sol, value = _question_and_solution(terms, ops)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return {"prompt": msgs, "question": q, "answer": str(value), "solution": sol}


def arithmetic_facts(*, max_operand: int = 9, ops: Sequence[str] = ("+", "-"), max_value: int | None = None,
                     system: str = "") -> list[Item]:
    """Every one-step question ``a op b`` with operands ``0..max_operand`` (and result in ``0..max_value``),
    in a fixed order: the facts a multi-step problem is composed of.

    A warm-up that trains on all facts and on the train side of the multi-step problems leaves the held-out
    multi-step problems answerable by composition alone (each step is a known fact, the chain is new), so
    held-out accuracy measures the procedure rather than recall of memorised answers.
    """
    return [_item([a, b], [op], system) for op in ops for a in range(max_operand + 1)
            for b in range(max_operand + 1) if _in_range([a, b], [op], max_value)]


def arithmetic_items(n: int | None, *, split: str = "train", seed: int = 0, max_operand: int = 20,
                     n_terms: int = 2, ops: Sequence[str] = ("+", "-"), heldout_fraction: float = 0.2,
                     system: str = "", max_value: int | None = None) -> list[Item]:
    """``n`` distinct synthetic arithmetic items of ``split`` (``train`` or ``heldout``), seeded.

    Operands are drawn uniformly from ``0..max_operand``; ``n_terms`` numbers joined by operators drawn from
    ``ops`` (evaluated left to right, each step written out in the ``<think>`` block). ``max_value``: keep only
    questions whose every running value lies in ``0..max_value`` (e.g. 9: every step is a one-digit fact).
    Raises when the space of distinct questions on that side is too small for ``n``. ``n=None``: every
    question the sampler finds on that side (it stops after ``50 x`` the space's size in draws), in the same
    order, so ``arithmetic_items(k)`` is always a prefix of ``arithmetic_items(None)`` and ``[k:]`` of the
    latter are questions the first ``k`` never include (a warm-up's share and the RL prompts after it).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise DataError(f"arithmetic ops: use some of {', '.join(OPS)}, got {list(ops)}")
    rng = random.Random(f"arith:{seed}:{split}")
    want_held = split == "heldout"
    seen: set[str] = set()
    out: list[Item] = []
    space = (max_operand + 1) ** n_terms * len(ops) ** (n_terms - 1)
    tries = 0
    while n is None or len(out) < n:
        tries += 1
        if tries > 50 * space + 1000:
            if n is None:
                break
            raise DataError(f"only {len(out)} distinct {split} arithmetic questions exist with max_operand="
                            f"{max_operand}, n_terms={n_terms}, max_value={max_value}; ask for fewer or widen the range")
        terms = [rng.randint(0, max_operand) for _ in range(n_terms)]
        chosen = [rng.choice(list(ops)) for _ in range(n_terms - 1)]
        if not _in_range(terms, chosen, max_value):
            continue
        item = _item(terms, chosen, system)
        q = item["question"]
        if q in seen or is_heldout(q, heldout_fraction, seed) != want_held:
            continue
        seen.add(q)
        out.append(item)
    return out


def sft_rows(items: Sequence[Item]) -> list[dict[str, Any]]:
    """Chat rows (``messages``) for a supervised warm-up on items' worked solutions (``lmstack finetune``)."""
    return [{"messages": [*it["prompt"], {"role": "assistant", "content": it["solution"]}]} for it in items]


def _messages(row: dict[str, Any], where: str, system: str) -> list[dict[str, str]]:
    if "messages" in row:
        msgs = [m for m in row["messages"] if m.get("role") != "assistant"]
    else:
        text = row.get("prompt", row.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: a prompt row needs 'prompt' or 'question' (a string) or 'messages'; "
                            f"this one has keys {sorted(row)}")
        msgs = [{"role": "user", "content": text}]
    return ([{"role": "system", "content": system}] if system and msgs[0]["role"] != "system" else []) + msgs


def row_items(paths: Sequence[str | os.PathLike] | str | os.PathLike, *, limit: int | None = None,
              system: str = "") -> list[Item]:
    """Items from row files: ``prompt``/``question``/``messages`` plus ``answer`` or ``tests`` (kept as given)."""
    from lmstack.sources import iter_rows

    out: list[Item] = []
    for where, row in iter_rows(paths):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "answer" not in row and "tests" not in row:
            raise DataError(f"{where}: a prompt row needs 'answer' (numeric tasks) or 'tests' (code tasks)")
        item = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
        item["prompt"] = _messages(row, where, system)
        item.setdefault("question", item["prompt"][-1]["content"])
        out.append(item)
    if not out:
        raise DataError(f"{paths}: no prompt rows")
    return out


def gsm8k_items(paths: Sequence[str | os.PathLike] | str | os.PathLike, *, limit: int | None = None,
                system: str = "") -> list[Item]:
    """GSM8K rows (``question``, ``answer`` = worked solution ending ``#### N``): the reference answer is the
    strictly extracted ``N``; the worked solution is kept as ``solution``."""
    from lmstack.align.rewards import gsm8k_answer

    items = row_items(paths, limit=limit, system=system)
    for it in items:
        sol = str(it["answer"])
        try:
            it["answer"] = gsm8k_answer(sol)
        except ValueError as e:
            raise DataError(f"GSM8K row {it['question'][:40]!r}: {e}") from None
        it["solution"] = sol
    return items


def split_items(items: Sequence[Item], fraction: float, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, held-out) by :func:`is_heldout` of each item's question."""
    train = [it for it in items if not is_heldout(str(it["question"]), fraction, seed)]
    held = [it for it in items if is_heldout(str(it["question"]), fraction, seed)]
    return train, held


def prompt_ids(tokenizer: Any, item: Item) -> list[int]:
    """The item's conversation rendered up to the assistant's turn with the model's chat template."""
    from lmstack.infer.text import chat_prompt_ids

    return chat_prompt_ids(tokenizer, item["prompt"])
