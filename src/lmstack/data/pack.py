"""Tokenize in parallel and pack token ids into memory-mapped shards.

A *shard set* is a folder::

    index.json          {"format": "lmstack.shards", "dtype": "uint16", "vocab_size", "eos_id", "tokens",
                         "documents", "shards": [{"file", "tokens", "documents"}], "meta": {...}}
    shard_00000.bin     raw token ids (little-endian uint16 when vocab_size <= 65536, else uint32),
    shard_00001.bin     each document followed by eos_id

A shard holds whole documents and closes once it reaches ``shard_tokens``. The folder is written under a
temporary name and renamed into place when complete (index last), so readers never see half a set.

Tokenization runs in ``workers`` processes (the tokenizer is pickled to them once, or, when it cannot be,
saved with ``.save(dir)`` and reloaded with :func:`lmstack.tokenizer.load_tokenizer`); chunks of documents
go out with at most ``2 x workers`` in flight and come back in order, so memory stays bounded on any corpus.
The tokenizer needs ``encode(text) -> list[int]`` (``encode_batch`` is used when present), ``vocab_size``
and ``eos_id``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import DataError
from lmstack.runs import atomic_dir, atomic_write_json, read_json

FORMAT = "lmstack.shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------------
# Parallel tokenization

_WORKER_TOKENIZER: Any = None


def _init_worker(payload: tuple[str, Any] | None) -> None:
    global _WORKER_TOKENIZER
    if payload is None:  # forked: the tokenizer was inherited from the parent
        return
    kind, value = payload
    if kind == "pickle":
        _WORKER_TOKENIZER = pickle.loads(value)
    else:
        from lmstack.tokenizer import load_tokenizer

        _WORKER_TOKENIZER = load_tokenizer(value)


def _encode(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` flattened, with the length of each (one array crosses the process boundary).

    One ``encode`` per text, not ``encode_batch``: the parallelism is the worker processes, and a batch call
    would start a thread pool per chunk (measured slower than a plain loop in ``bench/data.py``)."""
    seqs = [tokenizer.encode(t) for t in texts]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOKENIZER, texts)


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def tokenize_stream(texts: Iterable[str], tokenizer: Any, workers: int = 2, chunk_docs: int = 64) -> Iterator[np.ndarray]:
    """Token ids (int64 array, no EOS) of each text, in input order, computed by ``workers`` processes."""
    if workers <= 1:
        for chunk in _chunks(texts, chunk_docs):
            yield from _split(*_encode(tokenizer, chunk))
        return
    global _WORKER_TOKENIZER
    with contextlib.ExitStack() as stack:
        payload: tuple[str, Any] | None = None
        if sys.platform.startswith("linux"):
            # fork is cheap, the children only tokenize, and they inherit the tokenizer without pickling
            ctx = mp.get_context("fork")
            _WORKER_TOKENIZER = tokenizer
            stack.callback(globals().__setitem__, "_WORKER_TOKENIZER", None)
        else:
            ctx = mp.get_context()
            try:
                payload = ("pickle", pickle.dumps(tokenizer))
            except (pickle.PicklingError, TypeError, AttributeError):
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lmstack-tok-"))
                tokenizer.save(tmp)
                payload = ("path", tmp)
        pool = stack.enter_context(ctx.Pool(workers, initializer=_init_worker, initargs=(payload,)))
        pending: deque = deque()
        for chunk in _chunks(texts, chunk_docs):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from _split(*pending.popleft().get())
        while pending:
            yield from _split(*pending.popleft().get())


# ---------------------------------------------------------------------------------------------------------
# Writing and reading shard sets

class ShardWriter:
    """Append documents (token ids) to a shard set; use as a context manager so the set lands atomically.

    ::

        with ShardWriter(out / "train", vocab_size=tok.vocab_size, eos_id=tok.eos_id) as w:
            for ids in tokenize_stream(texts, tok):
                w.add(ids)
        w.index  # the index.json contents
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int, eos_id: int, shard_tokens: int = 50_000_000,
                 meta: dict[str, Any] | None = None):
        if not 0 <= eos_id < vocab_size:
            raise DataError(f"eos_id {eos_id} is outside the vocabulary of {vocab_size}")
        self.path = Path(path)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = max(1, shard_tokens)
        self.meta = meta or {}
        self.shards: list[dict[str, Any]] = []
        self.index: dict[str, Any] = {}
        self._stack: contextlib.ExitStack | None = None
        self._dir: Path | None = None
        self._file: Any = None
        self._cur_tokens = self._cur_docs = 0
        self._eos = np.array([eos_id], dtype=self.dtype)

    def __enter__(self) -> ShardWriter:
        self._stack = contextlib.ExitStack()
        self._dir = self._stack.enter_context(atomic_dir(self.path))
        return self

    def add(self, ids: np.ndarray | list[int]) -> None:
        """Append one document and its EOS."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) while packing {self.path}")
        if self._file is None:
            name = f"shard_{len(self.shards):05d}.bin"
            self._file = open(self._dir / name, "wb")
            self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._file.write(arr.astype(self.dtype).tobytes())
        self._file.write(self._eos.tobytes())
        self._cur_tokens += arr.size + 1
        self._cur_docs += 1
        if self._cur_tokens >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.shards[-1].update(tokens=self._cur_tokens, documents=self._cur_docs)
            self._cur_tokens = self._cur_docs = 0

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._stack is not None
        if exc_type is not None and self._file is not None:
            self._file.close()
        self._close_shard()
        if exc_type is None:
            self.index = {"format": FORMAT, "version": 1, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                          "eos_id": self.eos_id, "tokens": sum(s["tokens"] for s in self.shards),
                          "documents": sum(s["documents"] for s in self.shards), "shards": self.shards,
                          "meta": self.meta}
            atomic_write_json(self._dir / "index.json", self.index)
        self._stack.__exit__(exc_type, exc, tb)


@dataclass
class ShardSet:
    """A shard set opened for reading: one read-only memmap per shard."""
    path: Path
    index: dict[str, Any]
    arrays: list[np.ndarray] = field(repr=False)

    @property
    def tokens(self) -> int:
        return int(self.index["tokens"])

    @property
    def eos_id(self) -> int:
        return int(self.index["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])


def open_shards(path: str | os.PathLike) -> ShardSet:
    """Open a shard set written by :class:`ShardWriter`; files that disagree with the index are a DataError."""
    path = Path(path)
    index = read_json(path / "index.json")
    if index.get("format") != FORMAT:
        raise DataError(f"{path}/index.json: not an lmstack shard index")
    dtype = np.dtype(index["dtype"])
    arrays = []
    for shard in index["shards"]:
        f = path / shard["file"]
        if not f.is_file():
            raise DataError(f"{f}: shard listed in index.json is missing")
        n = f.stat().st_size // dtype.itemsize
        if n != shard["tokens"]:
            raise DataError(f"{f}: holds {n} tokens, index.json says {shard['tokens']}")
        arrays.append(np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype))
    return ShardSet(path, index, arrays)


def pack_texts(texts: Iterable[str], tokenizer: Any, out_dir: str | os.PathLike, shard_tokens: int = 50_000_000,
               workers: int = 2, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize ``texts`` and write them as one shard set at ``out_dir``; return its index."""
    with ShardWriter(out_dir, tokenizer.vocab_size, tokenizer.eos_id, shard_tokens, meta) as writer:
        for ids in tokenize_stream(texts, tokenizer, workers):
            writer.add(ids)
    return writer.index
