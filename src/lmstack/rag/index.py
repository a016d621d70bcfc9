"""Indexes behind one :class:`Index` protocol: BM25, dense (exact, FAISS HNSW, FAISS IVF-PQ) and hybrid.

Every index holds :class:`~lmstack.rag.chunk.Chunk` s, supports ``add`` / ``delete`` (by chunk id),
``search(query, k, where=...)`` with metadata filters, ``save(folder)`` and :func:`load_index`:

- ``save`` writes the whole folder under a temporary name and renames it into place (:func:`lmstack.runs.
  atomic_dir`): a process killed while saving leaves the previous index as it was. The manifest records a
  SHA-256 per file; :func:`load_index` refuses a changed or truncated file with one line naming it. A saved
  and reloaded index writes the same bytes again and returns the same scores (the round trip is bit-exact).
- A dense index records the id of the embedder it was built with (:attr:`DenseIndex.embedder_id`) and
  refuses vectors or a :class:`Query` embedded by another one.
- ``where`` filters: ``{"doc_id": "a"}``, ``{"source": ["x.md", "y.md"]}`` (any of), any metadata key, or a
  callable ``chunk -> bool``.

Dense backends: ``exact`` is one matrix product over L2-normalised vectors (inner product = cosine);
``hnsw`` is ``faiss.IndexHNSWFlat`` (inner product; ``M``, ``ef_construction``, ``ef_search``); ``ivfpq`` is
``faiss.IndexIVFPQ`` (trained on the first batch added; ``nlist``, ``m`` sub-quantisers of 8 bits, ``nprobe``).
FAISS deletions are tombstones applied with an ID selector at search time, so results are those of an index
without the deleted rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.rag.bm25 import BM25, tokenize, top_rows
from lmstack.rag.chunk import Chunk

FORMAT = "lmstack.rag.index"
VERSION = 1
Where = Mapping[str, Any] | Callable[[Chunk], bool] | None


@dataclass
class Query:
    """A query: its text (BM25) and, for dense search, its vector and the id of the embedder that made it."""
    text: str
    vector: np.ndarray | None = None
    embedder_id: str | None = None


@dataclass
class Hit:
    chunk: Chunk
    score: float


@runtime_checkable
class Index(Protocol):
    kind: str

    def __len__(self) -> int: ...
    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray | None = None) -> None: ...
    def delete(self, chunk_ids: Iterable[str]) -> int: ...
    def search(self, query: Query | str, k: int = 10, where: Where = None) -> list[Hit]: ...
    def save(self, folder: str | Path) -> Path: ...


def matches(chunk: Chunk, where: Where) -> bool:
    if where is None:
        return True
    if callable(where):
        return bool(where(chunk))
    for key, want in where.items():
        value = getattr(chunk, key) if key in ("id", "doc_id", "source", "title") else chunk.metadata.get(key)
        if key == "heading":
            value = chunk.heading
            if (want not in value) if isinstance(want, str) else (tuple(want) != value):
                return False
            continue
        if isinstance(want, (list, tuple, set, frozenset)):
            if value not in want:
                return False
        elif value != want:
            return False
    return True


def _as_query(query: Query | str) -> Query:
    return Query(query) if isinstance(query, str) else query


class _Store:
    """The chunks of an index in row order, with the id -> row map and the filter mask."""

    kind = ""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._row

    def _check_new(self, chunks: Sequence[Chunk]) -> None:
        seen = set()
        for c in chunks:
            if c.id in self._row or c.id in seen:
                raise DataError(f"chunk id {c.id!r} is already in the index; delete it first (or use unique "
                                f"document ids)")
            seen.add(c.id)

    def _reindex(self) -> None:
        self._row = {c.id: i for i, c in enumerate(self.chunks)}

    def _mask(self, where: Where) -> np.ndarray | None:
        if where is None:
            return None
        return np.fromiter((matches(c, where) for c in self.chunks), dtype=bool, count=len(self.chunks))

    def _write_chunks(self, folder: Path) -> None:
        with open(folder / "chunks.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in self.chunks)

    @staticmethod
    def _read_chunks(folder: Path) -> list[Chunk]:
        rows = []
        with open(folder / "chunks.jsonl", encoding="utf-8") as f:
            for line in f:
                rows.append(Chunk.from_json(json.loads(line)))
        return rows

    def save(self, folder: str | Path) -> Path:
        from lmstack.runs import atomic_dir

        with atomic_dir(folder) as tmp:
            _write_manifest(tmp, self._write(tmp))
        return Path(folder)

    def _write(self, folder: Path) -> dict[str, Any]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------ BM25

class BM25Index(_Store):
    kind = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25, stopwords: Sequence[str] = ()):
        super().__init__()
        self.k1, self.b, self.epsilon, self.stopwords = k1, b, epsilon, tuple(sorted(stopwords))
        self._tokens: list[list[str]] = []
        self._engine: BM25 | None = None  # rebuilt after add/delete: idf and avgdl depend on every document

    def tokens(self, text: str) -> list[str]:
        return tokenize(text, self.stopwords)

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray | None = None) -> None:
        self._check_new(chunks)
        for c in chunks:
            self._row[c.id] = len(self.chunks)
            self.chunks.append(c)
            self._tokens.append(self.tokens(c.text))
        self._engine = None

    def delete(self, chunk_ids: Iterable[str]) -> int:
        drop = {self._row[i] for i in chunk_ids if i in self._row}
        if drop:
            self.chunks = [c for r, c in enumerate(self.chunks) if r not in drop]
            self._tokens = [t for r, t in enumerate(self._tokens) if r not in drop]
            self._reindex()
            self._engine = None
        return len(drop)

    @property
    def engine(self) -> BM25:
        if self._engine is None:
            self._engine = BM25(self._tokens, self.k1, self.b, self.epsilon)
        return self._engine

    def search(self, query: Query | str, k: int = 10, where: Where = None) -> list[Hit]:
        if not self.chunks:
            return []
        q = _as_query(query)
        return [Hit(self.chunks[r], s) for r, s in self.engine.top_k(self.tokens(q.text), k, self._mask(where))]

    def _write(self, folder: Path) -> dict[str, Any]:
        self._write_chunks(folder)
        return {"kind": self.kind, "params": {"k1": self.k1, "b": self.b, "epsilon": self.epsilon,
                                              "stopwords": list(self.stopwords)}}

    @classmethod
    def _read(cls, folder: Path, manifest: dict[str, Any]) -> BM25Index:
        p = manifest["params"]
        index = cls(p["k1"], p["b"], p["epsilon"], p["stopwords"])
        index.add(cls._read_chunks(folder))
        return index


# ----------------------------------------------------------------------------------------------------- dense

BACKENDS = ("exact", "hnsw", "ivfpq")


class DenseIndex(_Store):
    """Chunks and their normalised vectors; ``backend`` is exact, hnsw or ivfpq (FAISS)."""

    kind = "dense"

    def __init__(self, embedder_id: str, dim: int, backend: str = "exact", embedder: dict[str, Any] | None = None,
                 hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128, nlist: int | None = None,
                 pq_m: int | None = None, nprobe: int = 16):
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"dense index backend: unknown {backend!r}; use {', '.join(BACKENDS)}")
        self.embedder_id, self.dim, self.backend = embedder_id, int(dim), backend
        self.embedder = dict(embedder or {"id": embedder_id})  # how to rebuild the embedder (CLI)
        self.params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                       "nlist": nlist, "pq_m": pq_m, "nprobe": nprobe}
        self.vectors = np.zeros((0, self.dim), dtype=np.float32)  # exact backend only
        self.alive = np.zeros(0, dtype=bool)                        # faiss backends: tombstones
        self._faiss: Any = None

    def __len__(self) -> int:
        return len(self._row)

    # -- checks
    def _check_embedder(self, embedder_id: str | None) -> None:
        if embedder_id is not None and embedder_id != self.embedder_id:
            raise ConfigError(f"the query was embedded with {embedder_id!r} but this index was built with "
                              f"{self.embedder_id!r}; embed it with the index's embedder (or rebuild the index)")

    def _check_vectors(self, vectors: Any, n: int) -> np.ndarray:
        if vectors is None:
            raise ConfigError("a dense index needs the chunks' vectors: add(chunks, embedder.embed_documents(...))")
        v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape != (n, self.dim):
            raise ConfigError(f"vectors: expected shape ({n}, {self.dim}), got {tuple(v.shape)}")
        return v

    # -- faiss
    def _faiss_module(self) -> Any:
        from lmstack.extras import require

        return require("faiss", f"the {self.backend} index")

    def _new_faiss(self, train: np.ndarray) -> Any:
        faiss = self._faiss_module()
        p = self.params
        if self.backend == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p["ef_construction"]
            return index
        n = len(train)
        nlist = p["nlist"] or max(1, min(4096, int(4 * np.sqrt(n)), n // 39))
        pq_m = p["pq_m"] or next(m for m in (self.dim // 8, self.dim // 4, self.dim // 2, self.dim, 1)
                                 if m and self.dim % m == 0)
        if self.dim % pq_m:
            raise ConfigError(f"ivfpq: pq_m={pq_m} must divide the dimension {self.dim}")
        if n < max(256, nlist):
            raise ConfigError(f"ivfpq: needs at least {max(256, nlist)} vectors in the first batch to train its "
                              f"codebooks, got {n}; use the exact or hnsw backend for small collections")
        self.params.update(nlist=nlist, pq_m=pq_m)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        self._quantizer = quantizer  # keep the Python object alive with the index
        return index

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray | None = None, embedder_id: str | None = None
            ) -> None:
        self._check_embedder(embedder_id)
        self._check_new(chunks)
        v = self._check_vectors(vectors, len(chunks))
        if not len(chunks):
            return
        if self.backend == "exact":
            self.vectors = np.concatenate([self.vectors, v])
        else:
            if self._faiss is None:
                self._faiss = self._new_faiss(v)
            self._faiss.add(v)
            self.alive = np.concatenate([self.alive, np.ones(len(chunks), dtype=bool)])
        for c in chunks:
            self._row[c.id] = len(self.chunks)
            self.chunks.append(c)

    def delete(self, chunk_ids: Iterable[str]) -> int:
        drop = sorted({self._row[i] for i in chunk_ids if i in self._row})
        if not drop:
            return 0
        if self.backend == "exact":
            keep = np.ones(len(self.chunks), dtype=bool)
            keep[drop] = False
            self.vectors = self.vectors[keep]
            self.chunks = [c for c, k in zip(self.chunks, keep) if k]
            self._reindex()
        else:
            self.alive[drop] = False
            for r in drop:
                del self._row[self.chunks[r].id]
        return len(drop)

    def vectors_for(self, chunk_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``chunk_ids`` (IVF-PQ: the reconstructed, quantised ones)."""
        rows = [self._row[i] for i in chunk_ids]
        if self.backend == "exact":
            return self.vectors[rows]
        if self.backend == "ivfpq":
            self._faiss.make_direct_map()
        return np.stack([self._faiss.reconstruct(int(r)) for r in rows]) if rows else np.zeros((0, self.dim))

    def _vector(self, query: Query | str) -> np.ndarray:
        q = _as_query(query)
        if q.vector is None:
            raise ConfigError("a dense index searches by vector: embed the query first (Embedder.query(text))")
        self._check_embedder(q.embedder_id)
        v = np.asarray(q.vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ConfigError(f"query vector: expected {self.dim} dimensions, got {v.shape[0]}")
        return v

    def search(self, query: Query | str, k: int = 10, where: Where = None) -> list[Hit]:
        return self.search_many([query], k, where)[0]

    def search_many(self, queries: Sequence[Query | str], k: int = 10, where: Where = None) -> list[list[Hit]]:
        """Hits for each query; the exact backend scores all of them with one matrix product."""
        if not queries:
            return []
        q = np.stack([self._vector(x) for x in queries])
        mask = self._mask(where)
        if not self._row:
            return [[] for _ in queries]
        if self.backend == "exact":
            scores = q @ self.vectors.T                                   # (Q, N) cosine similarities
            return [[Hit(self.chunks[r], s) for r, s in top_rows(row, k, allowed=mask)] for row in scores]
        faiss = self._faiss_module()
        allowed = self.alive if mask is None else (self.alive & mask)
        params = None
        bits = None
        if not allowed.all():
            bits = np.packbits(allowed, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
            params = (faiss.SearchParametersHNSW(sel=sel, efSearch=self.params["ef_search"])
                      if self.backend == "hnsw" else faiss.SearchParametersIVF(sel=sel, nprobe=self.params["nprobe"]))
        elif self.backend == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=self.params["ef_search"])
        else:
            params = faiss.SearchParametersIVF(nprobe=self.params["nprobe"])
        dist, ids = self._faiss.search(q, min(k, len(self.chunks)), params=params)
        del bits
        return [[Hit(self.chunks[int(r)], float(s)) for r, s in zip(ir, dr) if r >= 0] for ir, dr in zip(ids, dist)]

    def _write(self, folder: Path) -> dict[str, Any]:
        self._write_chunks(folder)
        if self.backend == "exact":
            np.save(folder / "vectors.npy", self.vectors, allow_pickle=False)
        else:
            np.save(folder / "alive.npy", self.alive, allow_pickle=False)
            data = self._faiss_module().serialize_index(self._faiss) if self._faiss is not None else np.zeros(0, np.uint8)
            (folder / "faiss.index").write_bytes(np.asarray(data).tobytes())
        return {"kind": self.kind, "backend": self.backend, "dim": self.dim, "embedder": self.embedder,
                "params": self.params}

    @classmethod
    def _read(cls, folder: Path, manifest: dict[str, Any]) -> DenseIndex:
        emb = manifest["embedder"]
        index = cls(emb["id"], manifest["dim"], manifest["backend"], emb, **manifest["params"])
        index.chunks = cls._read_chunks(folder)
        if index.backend == "exact":
            index.vectors = np.load(folder / "vectors.npy", allow_pickle=False)
            index._reindex()
        else:
            index.alive = np.load(folder / "alive.npy", allow_pickle=False)
            data = np.frombuffer((folder / "faiss.index").read_bytes(), dtype=np.uint8)
            index._faiss = index._faiss_module().deserialize_index(data.copy()) if len(data) else None
            index._row = {c.id: i for i, c in enumerate(index.chunks) if index.alive[i]}
        return index


# ---------------------------------------------------------------------------------------------------- hybrid

class HybridIndex:
    """BM25 and dense together; results fused by reciprocal rank (``fusion="rrf"``, k=60) or by weighted
    min-max-normalised scores (``fusion="weighted"``), over the top ``depth`` hits of each."""

    kind = "hybrid"

    def __init__(self, bm25: BM25Index, dense: DenseIndex, fusion: str = "rrf", rrf_k: int = 60,
                 weights: tuple[float, float] = (0.5, 0.5), depth: int = 100):
        if fusion not in ("rrf", "weighted"):
            raise ConfigError(f"hybrid fusion: unknown {fusion!r}; use rrf or weighted")
        self.bm25, self.dense = bm25, dense
        self.fusion, self.rrf_k, self.weights, self.depth = fusion, rrf_k, tuple(weights), depth

    @property
    def embedder_id(self) -> str:
        return self.dense.embedder_id

    @property
    def embedder(self) -> dict[str, Any]:
        return self.dense.embedder

    @property
    def chunks(self) -> list[Chunk]:
        return self.bm25.chunks

    def __len__(self) -> int:
        return len(self.bm25)

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray | None = None, embedder_id: str | None = None
            ) -> None:
        self.dense._check_embedder(embedder_id)
        self.dense._check_vectors(vectors, len(chunks))
        self.bm25._check_new(chunks)
        self.dense.add(chunks, vectors)
        self.bm25.add(chunks)

    def delete(self, chunk_ids: Iterable[str]) -> int:
        ids = list(chunk_ids)
        self.dense.delete(ids)
        return self.bm25.delete(ids)

    def search(self, query: Query | str, k: int = 10, where: Where = None) -> list[Hit]:
        from lmstack.rag.fusion import reciprocal_rank_fusion, weighted_fusion

        q = _as_query(query)
        lists = [self.bm25.search(q, self.depth, where), self.dense.search(q, self.depth, where)]
        by_id = {h.chunk.id: h.chunk for hits in lists for h in hits}
        if self.fusion == "rrf":
            fused = reciprocal_rank_fusion([[h.chunk.id for h in hits] for hits in lists], self.rrf_k, self.weights)
        else:
            fused = weighted_fusion([{h.chunk.id: h.score for h in hits} for hits in lists], self.weights)
        return [Hit(by_id[i], s) for i, s in fused[:k]]

    def save(self, folder: str | Path) -> Path:
        from lmstack.runs import atomic_dir

        with atomic_dir(folder) as tmp:
            for name, sub in (("bm25", self.bm25), ("dense", self.dense)):
                (tmp / name).mkdir()
                _write_manifest(tmp / name, sub._write(tmp / name))
            _write_manifest(tmp, {"kind": self.kind, "params": {"fusion": self.fusion, "rrf_k": self.rrf_k,
                                                                "weights": list(self.weights), "depth": self.depth}})
        return Path(folder)

    @classmethod
    def _read(cls, folder: Path, manifest: dict[str, Any]) -> HybridIndex:
        p = manifest["params"]
        bm25, dense = load_index(folder / "bm25"), load_index(folder / "dense")
        return cls(bm25, dense, p["fusion"], p["rrf_k"], tuple(p["weights"]), p["depth"])


# ------------------------------------------------------------------------------------------- files on disk

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    body = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
    (folder / "manifest.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")


READERS: dict[str, Any] = {"bm25": BM25Index, "dense": DenseIndex, "hybrid": HybridIndex}


def load_index(folder: str | Path) -> BM25Index | DenseIndex | HybridIndex:
    """An index saved by ``save``; a missing, foreign or corrupt folder is a DataError naming the file."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"{folder}: not an lmstack rag index (no manifest.json); build one with `lmstack rag index`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mpath}: corrupt index manifest ({e}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{mpath}: not an lmstack rag index manifest; rebuild the index")
    if manifest.get("version") != VERSION:
        raise DataError(f"{mpath}: index format version {manifest.get('version')}, this lmstack reads {VERSION}; "
                        f"rebuild the index")
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing from the index; rebuild the index")
        if _sha256(path) != digest:
            raise DataError(f"{path}: corrupt (its checksum differs from the manifest's); rebuild the index")
    kind = manifest.get("kind")
    if kind not in READERS:
        raise DataError(f"{mpath}: unknown index kind {kind!r}; rebuild the index")
    return READERS[kind]._read(folder, manifest)
