"""BM25 (Okapi), scored exactly as ``rank_bm25.BM25Okapi`` at the same ``k1``, ``b``, ``epsilon`` and tokens.

    idf(t)   = ln(N - n(t) + 0.5) - ln(n(t) + 0.5)          (N documents, n(t) of them hold t)
               a negative idf is replaced by epsilon * mean idf over the vocabulary (rank_bm25's floor)
    score(d) = sum over query tokens q (repeats count) of
               idf(q) * tf(q,d) * (k1 + 1) / (tf(q,d) + k1 * (1 - b + b * |d| / avgdl))

:func:`bm25_scores` scores one query against a tokenised corpus; :class:`BM25` keeps the per-posting weights
in a compressed sparse column layout (term -> documents), so a query touches only the postings of its terms
and sums them with one ``np.bincount``, in the order rank_bm25 adds them (the floats are equal, not close).

:func:`tokenize` is the one tokeniser of the rag layer (index, queries, benchmark): lower case, ``\\w+`` words,
optional stopwords.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lmstack.errors import ConfigError

_WORD = re.compile(r"\w+")
# a short English list (the most frequent function words); pass stopwords=ENGLISH_STOPWORDS to use it
ENGLISH_STOPWORDS = frozenset([
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "he", "in", "is", "it",
    "its", "of", "on", "or", "she", "that", "the", "their", "them", "they", "this", "to", "was", "were", "which",
    "who", "will", "with"])


def tokenize(text: str, stopwords: Iterable[str] | None = None) -> list[str]:
    """Lower-cased ``\\w+`` words of ``text``, without ``stopwords``."""
    words = _WORD.findall(text.lower())
    if stopwords:
        stop = stopwords if isinstance(stopwords, (set, frozenset)) else set(stopwords)
        words = [w for w in words if w not in stop]
    return words


class BM25:
    """An Okapi BM25 index over tokenised documents (rows 0..N-1)."""

    def __init__(self, corpus_tokens: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25):
        if not corpus_tokens:
            raise ConfigError("bm25: the corpus is empty; index at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise ConfigError(f"bm25: need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b, self.epsilon = k1, b, epsilon
        n_docs = len(corpus_tokens)
        doc_len = np.array([len(d) for d in corpus_tokens], dtype=np.float64)
        self.avgdl = sum(len(d) for d in corpus_tokens) / n_docs
        # postings per term, terms in first-seen order (rank_bm25's dict order, which its mean idf sums in)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for row, doc in enumerate(corpus_tokens):
            freqs: dict[str, int] = {}
            for w in doc:
                freqs[w] = freqs.get(w, 0) + 1
            for w, f in freqs.items():
                p = postings.setdefault(w, ([], []))
                p[0].append(row)
                p[1].append(f)
        idf = {w: math.log(n_docs - len(p[0]) + 0.5) - math.log(len(p[0]) + 0.5) for w, p in postings.items()}
        idf_sum = 0.0
        for v in idf.values():
            idf_sum += v
        eps = self.epsilon * (idf_sum / len(idf)) if idf else 0.0
        self.idf = {w: (eps if v < 0 else v) for w, v in idf.items()}
        self.vocab = {w: i for i, w in enumerate(postings)}
        indptr = np.zeros(len(postings) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(p[0]) for p in postings.values()])
        rows = np.fromiter((r for p in postings.values() for r in p[0]), dtype=np.int64, count=int(indptr[-1]))
        tf = np.fromiter((f for p in postings.values() for f in p[1]), dtype=np.float64, count=int(indptr[-1]))
        idf_col = np.repeat(np.array([self.idf[w] for w in postings], dtype=np.float64), np.diff(indptr))
        norm = self.k1 * (1 - self.b + self.b * doc_len[rows] / self.avgdl)
        self.indptr, self.rows = indptr, rows
        self.weights = idf_col * (tf * (self.k1 + 1) / (tf + norm))  # rank_bm25's operation order
        self.n_docs = n_docs

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every document (float64, length N) for one tokenised query."""
        cols = [self.vocab[q] for q in query_tokens if q in self.vocab]
        if not cols:
            return np.zeros(self.n_docs)
        if len(cols) == 1:
            out = np.zeros(self.n_docs)
            c = cols[0]
            out[self.rows[self.indptr[c]:self.indptr[c + 1]]] = self.weights[self.indptr[c]:self.indptr[c + 1]]
            return out
        rows = np.concatenate([self.rows[self.indptr[c]:self.indptr[c + 1]] for c in cols])
        w = np.concatenate([self.weights[self.indptr[c]:self.indptr[c + 1]] for c in cols])
        return np.bincount(rows, weights=w, minlength=self.n_docs)

    def top_k(self, query_tokens: Sequence[str], k: int, mask: np.ndarray | None = None
              ) -> list[tuple[int, float]]:
        """The ``k`` best rows with score > 0 (ties by row), optionally only rows where ``mask`` is true."""
        s = self.scores(query_tokens)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        return top_rows(s, k, positive=True)


def top_rows(scores: np.ndarray, k: int, positive: bool = False, allowed: np.ndarray | None = None
             ) -> list[tuple[int, float]]:
    """Indices and values of the ``k`` largest ``scores``, best first, ties broken by the lower index."""
    idx = np.arange(len(scores))
    if allowed is not None:
        idx = idx[allowed]
    if positive:
        idx = idx[scores[idx] > 0]
    if len(idx) > k:
        part = idx[np.argpartition(-scores[idx], k - 1)[:k]]
        kth = scores[part].min()
        idx = idx[scores[idx] >= kth]  # every tie of the k-th value, so the index tie-break is exact
    order = idx[np.lexsort((idx, -scores[idx]))][:k]
    return [(int(i), float(scores[i])) for i in order]


def bm25_scores(query_tokens: Sequence[str], corpus_tokens: Sequence[Sequence[str]], k1: float = 1.5,
                b: float = 0.75, epsilon: float = 0.25) -> np.ndarray:
    """BM25 scores of one tokenised query against a tokenised corpus, equal to ``rank_bm25.BM25Okapi``'s."""
    return BM25(corpus_tokens, k1, b, epsilon).scores(query_tokens)
