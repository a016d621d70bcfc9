"""GloVe (Pennington, Socher & Manning 2014): global co-occurrence counts fitted by weighted least squares.

Counting: every pair of words at distance k <= ``window`` in one sentence adds 1/k to X[i, j] and to X[j, i]
(GloVe's ``cooccur`` with a symmetric window). The counts are accumulated sparsely, chunk by chunk, as
sorted (row * V + column) keys with their sums (numpy only), so memory follows the non-zero entries, not V^2.

Fitting: minimise sum f(X_ij) (w_i . c_j + b_i + b'_j - log X_ij)^2 with f(x) = min(1, (x / x_max)^alpha) over
the non-zero entries, with AdaGrad (squared-gradient sums starting at 1, as glove.c) on shuffled mini-batches of
entries; the entries of a batch update their rows at once (``index_add_``, a rows' updates summed, as
glove.c's Hogwild threads would race). The vector of a word is w_i + c_i (glove.c's ``-model 2``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lmstack.embed.config import GloVeConfig, VocabConfig
from lmstack.embed.vectors import WordVectors
from lmstack.embed.vocab import Corpus, Vocab, build_corpus, check_window

CHUNK_WORDS = 1 << 20


@dataclass
class Cooccurrence:
    """A sparse symmetric co-occurrence matrix in coordinate form (row-major order, no zeros)."""

    rows: np.ndarray     # int64
    cols: np.ndarray     # int64
    values: np.ndarray   # float64
    size: int            # V

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def dense(self) -> np.ndarray:
        x = np.zeros((self.size, self.size))
        x[self.rows, self.cols] = self.values
        return x


@dataclass
class GloVeParams:
    """The fitted parameters: word and context vectors and their biases (float64)."""

    w: np.ndarray
    c: np.ndarray
    bw: np.ndarray
    bc: np.ndarray

    def log_fit(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The model's log X at the given entries: w_i . c_j + b_i + b'_j."""
        return (self.w[rows] * self.c[cols]).sum(1) + self.bw[rows] + self.bc[cols]

    def vectors(self) -> np.ndarray:
        """w + c, the vectors glove.c saves by default (``-model 2``)."""
        return (self.w + self.c).astype(np.float32)


def _merge(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=values, minlength=uniq.size)


def cooccurrence(corpus: Corpus, vocab_size: int, window: int) -> Cooccurrence:
    """X[i, j] = sum of 1/distance over the pairs (i, j) within ``window`` words of each other in a sentence."""
    ids, sent, n = corpus.ids.astype(np.int64), corpus.sentence, corpus.words
    acc_keys, acc_vals = np.empty(0, np.int64), np.empty(0)
    for start in range(0, n, CHUNK_WORDS):
        stop = min(n, start + CHUNK_WORDS)
        keys, vals = [acc_keys], [acc_vals]
        for k in range(1, window + 1):
            left = np.arange(start, min(stop, n - k))
            if left.size == 0:
                continue
            right = left + k
            same = sent[left] == sent[right]
            a, b = ids[left[same]], ids[right[same]]
            w = np.full(a.size, 1.0 / k)
            keys += [a * vocab_size + b, b * vocab_size + a]
            vals += [w, w]
        acc_keys, acc_vals = _merge(np.concatenate(keys), np.concatenate(vals))
    return Cooccurrence(acc_keys // vocab_size, acc_keys % vocab_size, acc_vals, vocab_size)


def train_glove(inputs: Iterable | str | os.PathLike, cfg: GloVeConfig | None = None,
                vocab_cfg: VocabConfig | None = None, log_path: str | os.PathLike | None = None,
                progress: bool = True) -> tuple[WordVectors, list[dict]]:
    """Build the vocabulary and co-occurrences of ``inputs`` and fit GloVe; returns the vectors and one record per
    epoch (mean weighted squared error ``loss``), also appended to the JSONL file ``log_path`` when given."""
    cfg = cfg or GloVeConfig()
    vocab, corpus = build_corpus(inputs, vocab_cfg or VocabConfig())
    return train_glove_corpus(vocab, corpus, cfg, log_path, progress)


def train_glove_corpus(vocab: Vocab, corpus: Corpus, cfg: GloVeConfig, log_path: str | os.PathLike | None = None,
                       progress: bool = True) -> tuple[WordVectors, list[dict]]:
    check_window(vocab, cfg.window, "glove.window")
    t0 = time.perf_counter()
    x = cooccurrence(corpus, len(vocab), cfg.window)
    if progress:
        print(f"glove: {x.nnz:,} non-zero co-occurrences of {len(vocab):,} words counted in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    params, history = fit_glove(x, cfg, log_path, progress)
    return WordVectors(vocab.words, params.vectors(), vocab.counts), history


def fit_glove(x: Cooccurrence, cfg: GloVeConfig, log_path: str | os.PathLike | None = None,
              progress: bool = True) -> tuple[GloVeParams, list[dict]]:
    """Fit the GloVe objective to ``x``; returns the parameters and one record per epoch."""
    import torch

    from lmstack.runs import JsonlLogger, Progress

    if x.nnz == 0:
        from lmstack.errors import DataError

        raise DataError("glove: no co-occurrences (every sentence has a single word); give longer sentences")
    V, d = x.size, cfg.dim
    gen = torch.Generator().manual_seed(cfg.seed)
    # One matrix per side holding the bias as a column, and a constant 1 column facing the other side's bias:
    # [w_i, b_i, 1] . [c_j, 1, b'_j] = w_i . c_j + b_i + b'_j, so one gather and one dot per side serve both.
    # glove.c: vectors and biases uniform in [-0.5, 0.5] / dim; squared-gradient sums start at 1.
    w = (torch.rand(V, d + 2, generator=gen) - 0.5) / d
    c = (torch.rand(V, d + 2, generator=gen) - 0.5) / d
    w[:, d + 1] = 1.0
    c[:, d] = 1.0
    free_w = torch.ones(d + 2)
    free_w[d + 1] = 0.0      # the constant columns never move
    free_c = torch.ones(d + 2)
    free_c[d] = 0.0
    gw, gc = torch.ones(V, d + 2), torch.ones(V, d + 2)
    rows, cols = torch.from_numpy(x.rows), torch.from_numpy(x.cols)
    logx = torch.from_numpy(np.log(x.values).astype(np.float32))
    weight = torch.from_numpy(np.minimum(1.0, (x.values / cfg.x_max) ** cfg.alpha).astype(np.float32))
    history: list[dict] = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    logger = JsonlLogger(log_path) if log_path else None
    bar = Progress(cfg.epochs * x.nnz, desc="glove", unit="entries", disable=not progress)
    lr = cfg.lr
    try:
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            order = torch.randperm(x.nnz, generator=gen)
            cost = 0.0
            for s in range(0, x.nnz, cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                i, j = rows[idx], cols[idx]
                wi, cj = w.index_select(0, i), c.index_select(0, j)
                diff = (wi * cj).sum(1) - logx[idx]
                fdiff = weight[idx] * diff
                cost += 0.5 * float((fdiff * diff).sum())
                grad_w, grad_c = fdiff[:, None] * cj * free_w, fdiff[:, None] * wi * free_c
                # AdaGrad per entry with its row's squared-gradient sum (glove.c), rows of one batch at once
                w.index_add_(0, i, -lr * grad_w / gw.index_select(0, i).sqrt())
                c.index_add_(0, j, -lr * grad_c / gc.index_select(0, j).sqrt())
                gw.index_add_(0, i, grad_w * grad_w)
                gc.index_add_(0, j, grad_c * grad_c)
                bar.update(idx.numel(), loss=cost / max(s + idx.numel(), 1))
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "loss": cost / x.nnz, "entries": x.nnz, "seconds": round(seconds, 3)}
            history.append(record)
            if logger:
                logger.log({"method": "glove", **record})
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
        if logger:
            logger.close()
    if progress:
        print(f"glove: {cfg.epochs} epochs, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}",
              file=sys.stderr)
    wn, cn = w.double().numpy(), c.double().numpy()
    return GloVeParams(wn[:, :d].copy(), cn[:, :d].copy(), wn[:, d].copy(), cn[:, d + 1].copy()), history
