"""Building an index from documents, retrieving for many questions, and evaluating retrieval.

The CLI (``lmstack rag``) and ``bench/rag.py`` share these functions.

Relevance in an evaluation file (``{"question": ..., "relevant": [...]}``) names documents by id or by source
path; a retrieved chunk counts for a relevant entry when its ``doc_id`` or ``source`` equals it, and several
chunks of one document count once (its best rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.rag.chunk import Chunk, Chunker, chunk_documents
from lmstack.rag.documents import Document
from lmstack.rag.index import BM25Index, DenseIndex, Hit, HybridIndex, Query

RETRIEVERS = ("bm25", "dense", "hybrid")


def build_index(docs: Sequence[Document], retriever: str, chunker: Chunker, embedder: Any = None,
                backend: str = "exact", progress: Callable[[int], None] | None = None,
                stopwords: Sequence[str] = (), **backend_options: Any) -> tuple[Any, list[Chunk]]:
    """An index of ``retriever`` kind over the chunks of ``docs`` (and the chunks)."""
    if retriever not in RETRIEVERS:
        raise ConfigError(f"--retriever: unknown {retriever!r}; use {', '.join(RETRIEVERS)}")
    chunks = chunk_documents(docs, chunker)
    if not chunks:
        raise DataError("the documents gave no chunk with text; check the chunker settings")
    if retriever == "bm25":
        index: Any = BM25Index(stopwords=stopwords)
        index.add(chunks)
        return index, chunks
    if embedder is None:
        raise ConfigError(f"the {retriever} retriever needs an embedder")
    dense = DenseIndex(embedder.id, embedder.dim, backend, embedder.spec(), **backend_options)
    vectors = embedder.embed_documents([c.text for c in chunks], progress)
    if retriever == "dense":
        dense.add(chunks, vectors, embedder_id=embedder.id)
        return dense, chunks
    index = HybridIndex(BM25Index(stopwords=stopwords), dense)
    index.add(chunks, vectors, embedder_id=embedder.id)
    return index, chunks


def needs_embedder(index: Any) -> bool:
    return isinstance(index, (DenseIndex, HybridIndex))


def embedder_for(index: Any, **options: Any) -> Any:
    """The embedder an index was built with (from its manifest), or None for BM25."""
    if not needs_embedder(index):
        return None
    from lmstack.rag.embed import Embedder

    return Embedder.from_spec(index.embedder, **options)


def make_queries(index: Any, embedder: Any, questions: Sequence[str]) -> list[Query]:
    if embedder is None:
        return [Query(q) for q in questions]
    return embedder.queries(questions)


def search_all(index: Any, queries: Sequence[Query], k: int, where: Any = None) -> list[list[Hit]]:
    """Hits for each query (a dense exact index scores them all with one matrix product)."""
    if isinstance(index, DenseIndex):
        out: list[list[Hit]] = []
        for start in range(0, len(queries), 1024):
            out += index.search_many(queries[start:start + 1024], k, where)
        return out
    return [index.search(q, k, where) for q in queries]


def mmr_rerank(index: HybridIndex | DenseIndex, query: Query, hits: list[Hit], lambda_: float = 0.7) -> list[Hit]:
    """``hits`` re-ordered by maximal marginal relevance over their stored vectors."""
    from lmstack.rag.fusion import mmr

    if not hits:
        return hits
    dense = index.dense if isinstance(index, HybridIndex) else index
    vecs = dense.vectors_for([h.chunk.id for h in hits])
    order = mmr(np.asarray(query.vector), vecs, len(hits), lambda_)
    return [hits[i] for i in order]


@dataclass
class Question:
    question: str
    relevant: list[str]


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Rows ``{"question": str, "relevant": [doc ids or source paths]}`` of a JSONL/JSON/Parquet file."""
    from lmstack.sources import iter_rows

    out = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(f"{where}: a question row needs a non-empty string 'question'")
        rel = row.get("relevant")
        if isinstance(rel, str):
            rel = [rel]
        if not isinstance(rel, list) or not rel or not all(isinstance(r, (str, int)) for r in rel):
            raise DataError(f"{where}: 'relevant' must be a non-empty list of document ids or source paths")
        out.append(Question(row["question"], [str(r) for r in rel]))
    if not out:
        raise DataError(f"{path}: no question rows")
    return out


def ranked_keys(hits: Sequence[Hit], relevant: set[str]) -> list[str]:
    """Each hit as the key it is judged by: its source when that is what ``relevant`` names, else its doc id."""
    return [h.chunk.source if h.chunk.doc_id not in relevant and h.chunk.source in relevant else h.chunk.doc_id
            for h in hits]


def evaluate_hits(all_hits: Sequence[Sequence[Hit]], questions: Sequence[Question], ks: Sequence[int],
                  ndcg_k: int = 10) -> dict[str, float]:
    from lmstack.rag.metrics import evaluate

    rankings = [ranked_keys(h, set(q.relevant)) for h, q in zip(all_hits, questions)]
    return evaluate(rankings, [q.relevant for q in questions], ks, ndcg_k)


def evaluate_index(index: Any, embedder: Any, questions: Sequence[Question], ks: Sequence[int] = (1, 5, 20),
                   ndcg_k: int = 10, reranker: Any = None, rerank_depth: int = 20) -> dict[str, dict[str, float]]:
    """``{retriever: metrics}``; a hybrid index is scored as bm25, dense and hybrid (its parts and itself).

    With a ``reranker`` (:mod:`lmstack.rag.rerank`) one more entry, ``"<retriever>+rerank"``: the index's
    own top ``rerank_depth`` re-ordered by it, the rest of its list after them."""
    depth = 4 * max([*ks, ndcg_k])  # chunks, so that several chunks of one document still leave enough documents
    queries = make_queries(index, embedder, [q.question for q in questions])
    parts = ([("bm25", index.bm25), ("dense", index.dense), ("hybrid", index)] if isinstance(index, HybridIndex)
             else [(index.kind, index)])
    out, last = {}, None
    for name, part in parts:
        last = search_all(part, queries, max(depth, rerank_depth) if reranker is not None else depth)
        out[name] = evaluate_hits(last, questions, ks, ndcg_k)
    if reranker is not None:
        from lmstack.rag.rerank import rerank_head

        reranked = [rerank_head(reranker, q.question, h, rerank_depth) for q, h in zip(questions, last)]
        out[f"{parts[-1][0]}+rerank"] = evaluate_hits(reranked, questions, ks, ndcg_k)
    return out
