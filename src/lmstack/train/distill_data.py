"""Sequence-level knowledge distillation data: the teacher's own continuations of prompts, as a JSONL text file.

Kim & Rush 2016 ("Sequence-Level Knowledge Distillation"): instead of matching the teacher's next-token
distribution on the training text (token-level KD, ``objective = "distill"``), the student is trained with the
plain next-token loss on text the teacher wrote, its (approximate) mode sequences (greedy or beam search) or
samples. The file this module writes is ordinary training text::

    lmstack compress distill-data runs/teacher --prompts prompts.txt --max-new-tokens 128 --out kd.jsonl
    lmstack train configs/train_tiny.toml --data.train kd.jsonl --data.tokenizer runs/teacher

One JSON object per line: ``{"text": prompt + completion, "prompt": ..., "completion": ..., "finish_reason": ...}``
(``text`` is what ``lmstack train`` reads by default). The two may also be combined: train on the teacher's
text with ``objective = "distill"`` for token-level targets on it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lmstack.errors import DataError


def read_prompts(paths: Sequence[str | os.PathLike], field: str = "text") -> list[str]:
    """Prompts: one per non-empty line of a .txt file; one per record (its ``field``) of .jsonl/.json/.parquet."""
    from lmstack.sources import expand_paths, iter_file_documents

    prompts: list[str] = []
    for path in expand_paths(paths):
        if path.suffix in (".txt", ".md", ""):
            prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            prompts += [d for d in iter_file_documents(path, field) if d.strip()]
    if not prompts:
        raise DataError(f"{', '.join(map(str, paths))}: no prompts found (one per line of a .txt file, or the "
                        f"{field!r} field of JSONL records)")
    return prompts


def teacher_continuations(model: nn.Module, tokenizer: Any, prompts: Sequence[str], config: Any,
                          batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """The teacher's completions of ``prompts`` (``config.num_return_sequences`` each), batch by batch through
    :func:`lmstack.infer.text.complete_batch` (left-padded batches, the tokenizer's EOS as the stop)."""
    from lmstack.infer.text import complete_batch

    per = config.num_return_sequences
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo:lo + batch_size])
        done = complete_batch(model, tokenizer, batch, config)
        for i, c in enumerate(done):
            prompt = batch[i // per]
            yield {"text": prompt + c.text, "prompt": prompt, "completion": c.text,
                   "finish_reason": c.finish_reason}


def write_distill_data(model: nn.Module, tokenizer: Any, prompts: Sequence[str], out: str | os.PathLike,
                       config: Any, batch_size: int = 16) -> int:
    """Write the teacher's continuations of ``prompts`` to the JSONL file ``out`` (atomically); returns the rows."""
    from lmstack.runs import atomic_write_text

    rows = [json.dumps(r, ensure_ascii=False) for r in teacher_continuations(model, tokenizer, prompts, config,
                                                                            batch_size)]
    atomic_write_text(Path(out), "".join(r + "\n" for r in rows))
    return len(rows)
