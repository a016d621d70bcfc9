"""Retrieval for retrieval-augmented generation: load documents, chunk, embed, index, retrieve, fuse, measure.

    docs, report = load_documents(["notes/", "papers/*.pdf"])
    chunks = chunk_documents(docs, RecursiveChunker(max_chars=1000))
    emb = Embedder()                                        # all-MiniLM-L6-v2, never downloaded
    index = DenseIndex(emb.id, emb.dim, embedder=emb.spec())
    index.add(chunks, emb.embed_documents([c.text for c in chunks]))
    hits = index.search(emb.query("how do I ...?"), k=5)
    a = answer("how do I ...?", hits, min_score=0.3)       # extractive, cited [n], or "I don't know"
    index.save("my.index"); index = load_index("my.index")

See docs/rag.md.
"""

from lmstack.rag.answer import Answer, Source, Verification, answer, render_prompt, verify
from lmstack.rag.bm25 import BM25, bm25_scores, tokenize
from lmstack.rag.chunk import (
    Chunk,
    Chunker,
    ParentChildChunker,
    RecursiveChunker,
    SemanticChunker,
    SentenceChunker,
    TokenChunker,
    WholeChunker,
    chunk_documents,
    make_chunker,
    parent_hits,
)
from lmstack.rag.documents import Document, LoadReport, iter_documents, load_documents
from lmstack.rag.fusion import mmr, reciprocal_rank_fusion, suppress_near_duplicates, weighted_fusion
from lmstack.rag.index import BM25Index, DenseIndex, Hit, HybridIndex, Index, Query, load_index
from lmstack.rag.metrics import (
    average_precision,
    evaluate,
    hit_rate,
    ndcg,
    precision,
    recall,
    reciprocal_rank,
    squad_exact_match,
    squad_f1,
)


def __getattr__(name: str):
    if name in ("Embedder", "EmbeddingCache"):  # torch is imported only when embeddings are wanted
        from lmstack.rag import embed

        return getattr(embed, name)
    raise AttributeError(name)


__all__ = [
    "BM25",
    "Answer",
    "BM25Index",
    "Chunk",
    "Chunker",
    "DenseIndex",
    "Document",
    "Embedder",
    "EmbeddingCache",
    "Hit",
    "HybridIndex",
    "Index",
    "LoadReport",
    "ParentChildChunker",
    "Query",
    "RecursiveChunker",
    "SemanticChunker",
    "SentenceChunker",
    "Source",
    "TokenChunker",
    "Verification",
    "WholeChunker",
    "answer",
    "average_precision",
    "bm25_scores",
    "chunk_documents",
    "evaluate",
    "hit_rate",
    "iter_documents",
    "load_documents",
    "load_index",
    "make_chunker",
    "mmr",
    "ndcg",
    "parent_hits",
    "precision",
    "recall",
    "reciprocal_rank",
    "reciprocal_rank_fusion",
    "render_prompt",
    "squad_exact_match",
    "squad_f1",
    "suppress_near_duplicates",
    "tokenize",
    "verify",
    "weighted_fusion",
]
