"""Calibration: run a model over a few batches and accumulate statistics of what chosen modules see.

The one hook helper of :mod:`lmstack.compress`: GPTQ's Hessians (``X^T X`` of each linear's input), Wanda's
input-channel norms, and the activation importance of heads, neurons and blocks in structured pruning all
come from :func:`accumulate`, one pass with forward hooks. :func:`text_batches` turns text files into
the ``(1, T)`` id batches it runs on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lmstack.errors import DataError

# (module inputs, module output) -> a tensor summed over the calibration batches, and the number of items
# it stands for (tokens, usually); the helper returns sums and counts so callers form any mean they need
Stat = Callable[[tuple[Any, ...], Any], tuple[torch.Tensor, int]]


@torch.no_grad()
def accumulate(model: nn.Module, stats: dict[str, Stat], batches: Iterable[Any], who: str = "calibration"
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run ``model(batch)`` over ``batches`` in eval mode with a forward hook on each named submodule.

    ``stats[name](inputs, output)`` returns ``(value, count)``; the values are summed over all calls of that
    module (every batch, every MoE expert call) and returned with the summed counts. A module that never
    runs is absent from the result. Empty ``batches`` is a DataError naming ``who``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, fn: Stat):
        def run(module, inputs, output):
            value, n = fn(inputs, output)
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + n
        return run

    handles = [model.get_submodule(name).register_forward_hook(hook(name, fn)) for name, fn in stats.items()]
    was = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not n_batches:
        raise DataError(f"{who}: the calibration data is empty; pass --calib with some text")
    return sums, counts


def flat_input(inputs: tuple[Any, ...]) -> torch.Tensor:
    """A module's first input as (N, features): every token of every sequence one row."""
    x = inputs[0].detach()
    return x.reshape(-1, x.shape[-1])


def text_batches(tokenizer: Any, paths: Sequence[str | os.PathLike], seq_len: int = 128, n_seqs: int = 32
                 ) -> list[torch.Tensor]:
    """Up to ``n_seqs`` calibration batches (1, ``seq_len``) of ids: the files' text, tokenized and cut into
    consecutive windows (the last, shorter window kept if it is the only one). No text is a DataError."""
    from lmstack.sources import expand_paths, read_text_file

    text = "\n".join(read_text_file(p) for p in expand_paths(list(paths)))
    ids = tokenizer.encode(text) if text.strip() else []
    if not ids:
        raise DataError(f"calib: {', '.join(map(str, paths)) or 'no file'}: the calibration text is empty; "
                        f"pass --calib with some text")
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:n_seqs]
    if len(windows) > 1 and len(windows[-1]) < seq_len:
        windows = windows[:-1]
    return [torch.tensor([w], dtype=torch.long) for w in windows]
