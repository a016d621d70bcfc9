"""Supervised fine-tuning data: rows -> chat messages -> (input ids, labels with loss on assistant tokens only).

Row formats (JSONL, JSON list, or Parquet; one example per row; the format is read from the fields):

- dialogue: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
  (ShareGPT's ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` too);
- instruction (Alpaca): ``{"instruction", "input" (optional), "output"}``, or ``{"prompt", "response"}``
  / ``{"prompt", "completion"}``; self-instruct seed tasks (``instruction`` + ``instances``) use their
  first instance. The user turn is the instruction, then a blank line and the input when there is one.
- an optional ``"system"`` string becomes the first message.

A row that fits none of these is a :class:`DataError` naming the file, the row number and its keys.

Rendering uses the tokenizer's chat template (:func:`lmstack.tokenizer.chat.render_chat`): the loss
mask is 1 on assistant content and its closing ``<|end|>``, so the model learns to answer and to stop,
never to imitate the user. Labels are the ids shifted left with -100 where the mask is 0.

Batching (the documented alternative to packing): our decoder's attention takes a causal mask plus
a per-token padding mask, not a block-diagonal one, so examples packed into one row would attend to
each other. Instead, batches group examples of similar length (sort within windows of
``50 * batch_size`` shuffled examples, then shuffle the batches), right-padded to the longest; with
length grouping the padding is a small fraction of the tokens (reported as ``pad_fraction``) and each
example sees only itself, exactly as at inference.

Default data (:func:`build_default_sft`): "explain what X does" questions about the Python standard
library's public functions and classes, answered by the first paragraph of their docstrings; made from
the running interpreter's own files, so it exists offline on every machine.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmstack.data.split import is_heldout
from lmstack.errors import DataError, LmstackError

Messages = list[dict[str, str]]
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------
# reading rows


def iter_rows(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of the JSONL/JSON/Parquet files named (files, folders, globs); the one
    streaming row reader of :mod:`lmstack.sources`, refusing plain-text files (they hold no examples)."""
    from lmstack.sources import expand_paths, iter_file_rows, row_suffix

    for f in expand_paths(paths):
        if row_suffix(f) is None:
            raise DataError(f"{f}: SFT data must be .jsonl, .json or .parquet")
        yield from iter_file_rows(f)


def row_to_messages(row: Any, where: str = "row") -> Messages:
    """The chat messages of one row (see the module docstring for the formats)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    msgs: Messages = []
    system = row.get("system")
    if isinstance(system, str) and system:
        msgs.append({"role": "system", "content": system})
    if "messages" in row or "conversations" in row:
        turns = row.get("messages", row.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for k, t in enumerate(turns):
            role = t.get("role", t.get("from")) if isinstance(t, dict) else None
            content = t.get("content", t.get("value")) if isinstance(t, dict) else None
            if role not in ROLE_ALIASES or not isinstance(content, str):
                raise DataError(f"{where}: message {k} needs a role (system/user/assistant) and a string content, "
                                f"got {t!r:.80}")
            msgs.append({"role": ROLE_ALIASES[role], "content": content})
    else:
        prompt = row.get("instruction", row.get("prompt"))
        answer = row.get("output", row.get("response", row.get("completion")))
        extra = row.get("input", "")
        if answer is None and isinstance(row.get("instances"), list) and row["instances"]:
            first = row["instances"][0]
            answer, extra = first.get("output"), first.get("input", "")
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(f"{where}: a row needs 'messages', or 'instruction' and 'output' (or 'prompt' and "
                            f"'response'); this one has keys {sorted(row)}")
        user = f"{prompt}\n\n{extra}" if isinstance(extra, str) and extra.strip() else prompt
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return msgs


# ----------------------------------------------------------------------------------------------------
# encoding


@dataclass
class Example:
    """One tokenized conversation: ``input_ids`` and ``labels`` (-100 outside assistant tokens), same length."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(1 for y in self.labels if y != -100)


def encode_messages(tokenizer: Any, messages: Messages, max_len: int, where: str = "",
                    last_turn_only: bool = False) -> Example | None:
    """Render, mask, shift and truncate to ``max_len`` positions; None when nothing is left to learn.

    ``last_turn_only``: the loss is on the final assistant message only (earlier assistant turns are part
    of the prompt): what preference methods score, e.g. the last reply of an HH-RLHF dialogue.
    """
    from lmstack.tokenizer.chat import render_chat

    try:
        ids, mask = render_chat(tokenizer, messages)
    except LmstackError as e:
        raise DataError(f"{where}: {e}") from None
    if last_turn_only:
        # role markers never occur inside content (content is encoded as plain text), so the last
        # assistant marker starts the last assistant message
        marker = tokenizer.special_tokens["<|assistant|>"]
        start = max((i for i, t in enumerate(ids) if t == marker), default=len(ids))
        mask = [0] * start + mask[start:]
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    x = ids[:-1]
    y = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    if not any(t != -100 for t in y):
        return None
    return Example(x, y, where)


def load_examples(paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: Any, max_len: int,
                  limit: int | None = None) -> tuple[list[Example], dict[str, int]]:
    """Tokenized examples of every row; stats count rows, kept examples and truncated/empty ones."""
    out: list[Example] = []
    stats = {"rows": 0, "examples": 0, "dropped_no_target": 0, "truncated": 0}
    for where, row in iter_rows(paths):
        if limit is not None and stats["rows"] >= limit:
            break
        stats["rows"] += 1
        ex = encode_messages(tokenizer, row_to_messages(row, where), max_len, where)
        if ex is None:
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += int(len(ex) == max_len)
        out.append(ex)
    if not out:
        raise DataError(f"{paths}: no usable SFT examples (rows: {stats['rows']})")
    stats["examples"] = len(out)
    return out, stats


def split_heldout(examples: list[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a stable hash of each example's ids decides, so the split does not depend on order."""
    if not 0.0 < fraction < 1.0:
        raise LmstackError(f"valid_fraction must be in (0, 1), got {fraction}")
    train, held = [], []
    for ex in examples:
        (held if is_heldout(str(ex.input_ids), fraction, seed) else train).append(ex)
    if not held:
        held, train = train[-1:], train[:-1]
    if not train:
        raise DataError("too few SFT examples to hold some out; add data or lower valid_fraction")
    return train, held


# ----------------------------------------------------------------------------------------------------
# batches


def collate(examples: Sequence[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: x (B, T) with ``pad_id``, y (B, T) with -100 on the padding."""
    t = max(len(e) for e in examples)
    x = torch.full((len(examples), t), pad_id, dtype=torch.long)
    y = torch.full((len(examples), t), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, : len(e)] = torch.tensor(e.input_ids)
        y[i, : len(e)] = torch.tensor(e.labels)
    return x, y


class SFTLoader:
    """Endless length-grouped batches with a resumable position (``state_dict``), like the pre-training loader.

    Each epoch: shuffle (seeded by seed + epoch), sort windows of ``group * batch_size`` examples by
    length, cut into batches, shuffle the batch order. ``next_batch() -> (x, y)``.
    """

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int = 0, seed: int = 0, group: int = 50):
        if not examples:
            raise DataError("no SFT examples to batch")
        self.examples, self.batch_size, self.pad_id, self.seed, self.group = examples, batch_size, pad_id, seed, group
        self.epoch, self.pos = 0, 0
        self._order = self._batches(0)

    def _batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.examples)))
        rng.shuffle(idx)
        window = self.group * self.batch_size
        batches = []
        for w in range(0, len(idx), window):
            chunk = sorted(idx[w:w + window], key=lambda i: len(self.examples[i]))
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        batch = self._order[self.pos]
        self.pos += 1
        return collate([self.examples[i] for i in batch], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._batches(self.epoch)

    def pad_fraction(self) -> float:
        """Padding share of the tokens over one epoch of batches."""
        real = padded = 0
        for b in self._batches(0):
            lens = [len(self.examples[i]) for i in b]
            real, padded = real + sum(lens), padded + max(lens) * len(lens)
        return 1.0 - real / padded


def eval_batches(examples: list[Example], batch_size: int, pad_id: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, length-sorted batches over all ``examples`` (for held-out loss)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for b in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[b:b + batch_size]], pad_id)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: list[Example], batch_size: int = 16, pad_id: int = 0,
                 device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy per assistant token over ``examples``: the one token-weighted held-out loss
    (:func:`lmstack.train.objectives.heldout_loss`), the number the trainer logs as ``val_loss``."""
    from lmstack.train.objectives import heldout_loss as token_weighted_loss

    return token_weighted_loss(model, eval_batches(examples, batch_size, pad_id), device=device)


# ----------------------------------------------------------------------------------------------------
# default data: questions about the standard library, answered by its docstrings


QUESTIONS = ("Explain what {name} does.", "What is {name} for?", "Describe {name} in the {module} module.",
             "In Python, what does {name} do?")


def _first_paragraph(doc: str, max_chars: int) -> str | None:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    if len(para) < 30 or para.startswith((">>>", "..")):
        return None
    if len(para) > max_chars:
        cut = para[:max_chars].rsplit(". ", 1)[0]
        para = cut if cut.endswith(".") or len(cut) < 30 else cut + "."
        if len(para) > max_chars:
            return None
    return para


def default_sft_rows(max_rows: int = 4000, max_chars: int = 300) -> list[dict[str, str]]:
    """Alpaca-style rows made from the stdlib: public module-level functions and classes with a docstring."""
    from lmstack.data.corpus import _stdlib_files, clean_docstring, stdlib_dir

    root = stdlib_dir()
    rows: list[dict[str, str]] = []
    files = _stdlib_files()
    random.Random(0).shuffle(files)       # modules in a fixed random order; stop once there are enough rows
    for path in files:
        if len(rows) >= max_rows:
            break
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if any(p.startswith("_") for p in parts):
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [(node, node.name) for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        for cls in [n for n, _ in nodes if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]:
            nodes += [(m, f"{cls.name}.{m.name}") for m in cls.body if isinstance(m, ast.FunctionDef)]
        for node, qual in nodes:
            if any(p.startswith("_") for p in qual.split(".")):
                continue
            doc = ast.get_docstring(node)
            cleaned = clean_docstring(doc) if doc else None
            answer = _first_paragraph(cleaned, max_chars) if cleaned else None
            if not answer:
                continue
            name = f"{module}.{qual}" + ("()" if isinstance(node, ast.FunctionDef) else "")
            h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=2).digest(), "little")
            question = QUESTIONS[h % len(QUESTIONS)].format(name=f"`{name}`", module=f"`{module}`")
            rows.append({"instruction": question, "output": answer, "source": f"docstring:{name}"})
    rng = random.Random(0)
    rng.shuffle(rows)
    return rows[:max_rows]


def build_default_sft(out_dir: str | os.PathLike, max_rows: int = 4000, valid_fraction: float = 0.05
                      ) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``valid.jsonl`` of default SFT rows under ``out_dir``; return counts."""
    from lmstack.runs import atomic_write_text

    rows = default_sft_rows(max_rows)
    split: dict[str, list[str]] = {"train": [], "valid": []}
    for r in rows:
        split["valid" if is_heldout(r["source"], valid_fraction) else "train"].append(json.dumps(r, ensure_ascii=False))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in split.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(line + "\n" for line in lines))
    return {"train": len(split["train"]), "valid": len(split["valid"]), "dir": str(out)}
