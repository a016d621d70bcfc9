"""Fixed-length training blocks from a shard set, shuffled, sharded across ranks, resumable mid-epoch.

Blocks: each shard of ``n`` tokens holds ``(n - 1) // block_size`` non-overlapping blocks; block ``j``
starts at ``j * block_size`` and reads ``block_size + 1`` tokens, so ``x = w[:-1]`` and ``y = w[1:]``
(next-token targets; documents inside a block are separated by EOS, as in GPT pre-training). Blocks
never cross shard boundaries.

Shuffle and sharding: every epoch uses a permutation of all blocks of all shards drawn from
``seed + epoch``. A global step takes ``world_size * batch_size`` consecutive entries of it, and rank
``r`` reads entries ``[r * batch_size, (r + 1) * batch_size)`` of that slice, so ranks never share a
block. The tail that does not fill a whole global step is skipped, so every rank sees the same number
of steps per epoch (``len(loader)``).

Constructor::

    BlockLoader(path_or_shardset, block_size, batch_size, *, seed=0, rank=0, world_size=1,
                holdout=0.0, device=None)

``holdout`` sets aside the last fraction of blocks (in shard order) for validation; iterate them with
:func:`validation_batches` (same ``holdout``). This block tail is an exception to the one held-out rule
(:func:`lmstack.data.split.is_heldout`, per document): the trainer uses it only for a pre-packed shard
folder given without a validation set, whose documents can no longer be told apart; text inputs are
split by document while they are packed (:mod:`lmstack.train.data`). Iteration is endless (epochs follow each other); each item
is ``(x, y)``, two ``torch.long`` tensors of shape ``(batch_size, block_size)``, on ``device`` if given.

State: ``state_dict()`` returns ``{"version", "seed", "epoch", "step", "blocks_consumed", "block_size",
"batch_size", "world_size", "num_blocks"}`` where ``step`` counts global steps done in the current epoch.
``load_state_dict(state)`` resumes so the next batch is exactly the one an uninterrupted run would have
produced. A different ``world_size`` or ``batch_size`` is accepted when the blocks consumed divide into
whole global steps of the new size; a different block size, seed or corpus is a :class:`DataError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmstack.data.pack import ShardSet, open_shards
from lmstack.errors import ConfigError, DataError


def _as_shards(data: str | os.PathLike | ShardSet) -> ShardSet:
    return data if isinstance(data, ShardSet) else open_shards(data)


class BlockIndex:
    """Global block ids -> (shard, start); the last ``holdout`` fraction of ids forms the validation split."""

    def __init__(self, shards: ShardSet, block_size: int, holdout: float = 0.0):
        if block_size < 1:
            raise ConfigError("block_size: must be >= 1")
        if not 0.0 <= holdout < 1.0:
            raise ConfigError("holdout: must be in [0, 1)")
        self.block_size = block_size
        counts = np.array([max(len(a) - 1, 0) // block_size for a in shards.arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # first global block id of each shard
        total = int(self.offsets[-1])
        n_val = int(round(total * holdout)) if holdout else 0
        if holdout and n_val == 0 and total > 1:
            n_val = 1
        self.train_blocks = total - n_val
        self.val_range = (self.train_blocks, total)
        self.total = total

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, (ids - self.offsets[shard]) * self.block_size


def _gather(shards: ShardSet, index: BlockIndex, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = index.block_size
    shard_ids, starts = index.locate(ids)
    w = np.empty((len(ids), t + 1), dtype=np.int64)
    for row, (s, start) in enumerate(zip(shard_ids, starts)):
        w[row] = shards.arrays[s][start: start + t + 1]
    w_t = torch.from_numpy(w)
    return w_t[:, :-1], w_t[:, 1:]  # (B, T) inputs, (B, T) next-token targets


class BlockLoader:
    """Endless ``(x, y)`` batches of ``(batch_size, block_size)`` token ids; see the module docstring."""

    def __init__(self, data: str | os.PathLike | ShardSet, block_size: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, holdout: float = 0.0, device: str | torch.device | None = None):
        if batch_size < 1:
            raise ConfigError("batch_size: must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.shards = _as_shards(data)
        self.index = BlockIndex(self.shards, block_size, holdout)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.global_batch = batch_size * world_size
        if self.index.train_blocks < self.global_batch:
            raise DataError(f"{self.shards.path}: {self.index.train_blocks} training blocks of {block_size} tokens "
                            f"cannot fill one step of {batch_size} x {world_size} ranks; use more data or smaller "
                            f"blocks/batches")
        self.epoch = 0
        self.step = 0  # global steps done in the current epoch
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self.index.train_blocks // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.index.train_blocks)
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= len(self):
            self.epoch += 1
            self.step = 0
            self._perm = None
        lo = self.step * self.global_batch + self.rank * self.batch_size
        ids = self._permutation()[lo: lo + self.batch_size]
        self.step += 1
        x, y = _gather(self.shards, self.index, ids)
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.seed, "epoch": self.epoch, "step": self.step,
                "blocks_consumed": self.step * self.global_batch, "block_size": self.block_size,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_blocks": self.index.train_blocks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the permutation depends on these only, so batch size and world size may change between runs
        mine = {"seed": self.seed, "block_size": self.block_size, "num_blocks": self.index.train_blocks}
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"loader state: {key} was {state.get(key)!r}, this loader has {value!r}; resume "
                                f"with the same data and loader settings")
        consumed = int(state["blocks_consumed"])
        if consumed % self.global_batch:
            raise DataError(f"loader state: {consumed} blocks consumed is not a whole number of steps of "
                            f"{self.batch_size} x {self.world_size} ranks")
        self.epoch = int(state["epoch"])
        self.step = consumed // self.global_batch
        self._perm = None


def validation_batches(data: str | os.PathLike | ShardSet, block_size: int, batch_size: int, *,
                       holdout: float = 0.0, max_batches: int | None = None, rank: int = 0, world_size: int = 1,
                       device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, unshuffled ``(x, y)`` batches for evaluation.

    With ``holdout > 0`` they come from the held-out tail of ``data`` (the blocks :class:`BlockLoader`
    with the same ``holdout`` never trains on); with ``holdout == 0`` from all of ``data`` (e.g. a
    separate ``val`` shard set). Ranks take interleaved batches; the last batch may be smaller.
    """
    shards = _as_shards(data)
    index = BlockIndex(shards, block_size, holdout)
    lo, hi = index.val_range if holdout else (0, index.total)
    ids = np.arange(lo, hi)
    n_batches = (len(ids) + batch_size - 1) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world_size):
        x, y = _gather(shards, index, ids[b * batch_size:(b + 1) * batch_size])
        if device is not None:
            x, y = x.to(device), y.to(device)
        yield x, y
