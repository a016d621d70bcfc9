"""word2vec: skip-gram and CBOW with negative sampling, trained the way word2vec.c and gensim train them, vectorised.

What is the same as word2vec.c: the input vectors start uniform in ±0.5/dim and the output vectors at zero; each
epoch drops frequent words with Mikolov's subsampling (keep a word of count c with probability
``(sqrt(c / (sample*N)) + 1) * sample*N / c``) before the windows are formed; each centre word draws its window
uniformly from 1..window; noise words come from the unigram distribution to the 0.75 (a noise word equal to the
positive word is skipped); the learning rate falls linearly from ``alpha`` to ``min_alpha`` over every word of
every epoch; skip-gram predicts the centre word from each context word's vector, CBOW from the mean of them;
plain SGD.

What differs: word2vec.c updates after every pair; here ``batch_size`` pairs (skip-gram) or centre words (CBOW)
are computed at once from the same weights and their row updates summed into the two matrices
(``index_add_``), which is what makes it fast in torch. Rows that repeat within a batch get the sum of their
updates, as they would (approximately) in sequence; with batches of a few thousand pairs (at most half the
vocabulary, :func:`batch_pairs`) the vectors match gensim's quality (``bench/embed.py``). ``compile=True`` runs
the same per-pair update through ``torch.compile``; ``shared_negatives`` and ``workers`` are faster variants
(see docs/embed.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

import numpy as np

from lmstack.embed.config import VocabConfig, Word2VecConfig
from lmstack.embed.vectors import WordVectors
from lmstack.embed.vocab import Corpus, Vocab, build_corpus, check_window

CHUNK_WORDS = 1 << 16  # centre words whose pairs are formed at once (bounds the memory of the pair arrays)


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """Mikolov's subsampling as in word2vec.c and gensim: the chance each word is kept (1 where ``sample`` is 0)."""
    if sample <= 0:
        return np.ones(len(counts))
    threshold = sample * float(counts.sum())
    c = counts.astype(np.float64)
    return np.minimum(1.0, (np.sqrt(c / threshold) + 1.0) * threshold / c)


def noise_table(counts: np.ndarray, exponent: float = 0.75, size: int = 0) -> np.ndarray:
    """word2vec.c's unigram table: word w fills a share count_w^exponent / sum of its entries, so a noise word is
    one uniform draw of an entry. ``size`` 0: 100 entries per word, between 1e6 and 1e7 (word2vec.c: 1e8)."""
    size = size or int(min(10**7, max(10**6, 100 * len(counts))))
    p = counts.astype(np.float64) ** exponent
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return np.searchsorted(cdf, (np.arange(size) + 0.5) / size).astype(np.int64)


def context_positions(sentence: np.ndarray, start: int, stop: int, window: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For centre positions ``start..stop-1``: an (n, 2*window) array of context positions and its validity mask.
    Each centre draws its window b in 1..window (word2vec.c's ``b = rand % window``); contexts stay in its sentence."""
    n_all = sentence.size
    centre = np.arange(start, stop)
    reach = rng.integers(1, window + 1, size=centre.size)
    offsets = np.concatenate([-np.arange(window, 0, -1), np.arange(1, window + 1)])
    pos = centre[:, None] + offsets[None, :]
    valid = (np.abs(offsets)[None, :] <= reach[:, None]) & (pos >= 0) & (pos < n_all)
    pos = np.clip(pos, 0, n_all - 1)
    valid &= sentence[pos] == sentence[centre][:, None]
    return pos, valid


def train_word2vec(inputs: Iterable | str | os.PathLike, cfg: Word2VecConfig | None = None,
                   vocab_cfg: VocabConfig | None = None, log_path: str | os.PathLike | None = None,
                   progress: bool = True) -> tuple[WordVectors, list[dict]]:
    """Build the vocabulary of ``inputs`` (paths or split sentences) and train word2vec on it.
    Returns the input vectors and one record per epoch (loss, learning rate, words/s), also appended to the JSONL
    file ``log_path`` when given."""
    cfg = cfg or Word2VecConfig()
    vocab, corpus = build_corpus(inputs, vocab_cfg or VocabConfig())
    return train_word2vec_corpus(vocab, corpus, cfg, log_path, progress)


def train_word2vec_corpus(vocab: Vocab, corpus: Corpus, cfg: Word2VecConfig,
                          log_path: str | os.PathLike | None = None,
                          progress: bool = True) -> tuple[WordVectors, list[dict]]:
    """Train on an already built corpus (see :func:`train_word2vec`)."""
    import torch

    from lmstack.runs import JsonlLogger, Progress

    check_window(vocab, cfg.window, "word2vec.window")
    V, d = len(vocab), cfg.dim
    gen = torch.Generator().manual_seed(cfg.seed)
    w_in = (torch.rand(V, d, generator=gen) - 0.5) / d
    w_out = torch.zeros(V, d)
    if cfg.workers > 1:  # Hogwild: the forked workers write into the same two matrices
        w_in.share_memory_()
        w_out.share_memory_()
    table = torch.from_numpy(noise_table(vocab.counts, cfg.ns_exponent))
    keep = keep_probabilities(vocab.counts, cfg.sample)
    total = corpus.words * cfg.epochs
    history: list[dict] = []
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    logger = JsonlLogger(log_path) if log_path else None
    bar = Progress(total, desc=f"word2vec {'skip-gram' if cfg.sg else 'CBOW'}", unit="words", disable=not progress)
    state = _State(corpus, keep, table, w_in, w_out, cfg, bar)
    if cfg.compile and cfg.sg and not cfg.shared_negatives:
        _warm_compiled(state)  # compile once here (~10 s), before any worker is forked
    try:
        with torch.no_grad():
            for epoch in range(cfg.epochs):
                t0 = time.perf_counter()
                if cfg.workers > 1:
                    loss_sum, loss_n, n, lr = _hogwild_epoch(state, epoch)
                else:
                    loss_sum, loss_n, n, lr = _epoch(state, epoch, 0)
                seconds = time.perf_counter() - t0
                record = {"epoch": epoch + 1, "loss": loss_sum / max(loss_n, 1), "lr": lr,
                          "words": corpus.words, "kept_words": n, "seconds": round(seconds, 3),
                          "words_per_s": corpus.words / max(seconds, 1e-9)}
                history.append(record)
                if logger:
                    logger.log({"method": "word2vec", **record})
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
        if logger:
            logger.close()
    if progress:
        print(f"word2vec: {cfg.epochs} epochs over {corpus.words:,} words, vocab {V:,}, loss "
              f"{history[-1]['loss']:.4f}, {total / max(sum(r['seconds'] for r in history), 1e-9):,.0f} words/s",
              file=sys.stderr)
    return WordVectors(vocab.words, w_in.numpy().copy(), vocab.counts), history


def _warm_compiled(st: _State) -> None:
    import torch

    step = batch_pairs(st.cfg.batch_size, st.w_in.shape[0])
    zeros = torch.zeros(step, dtype=torch.int64)
    with torch.no_grad():
        compiled_pair_update()(st.w_in, st.w_out, zeros, zeros, torch.zeros(step, st.cfg.negative, dtype=torch.int64),
                               torch.zeros(step), torch.tensor(0.0))


class _State:
    """What every epoch of every worker reads (and the two matrices it writes)."""

    def __init__(self, corpus, keep, table, w_in, w_out, cfg, bar):
        self.corpus, self.keep, self.table, self.w_in, self.w_out = corpus, keep, table, w_in, w_out
        self.cfg, self.bar = cfg, bar


def _epoch(st: _State, epoch: int, rank: int) -> tuple[float, int, int, float]:
    """One epoch's share of worker ``rank``: the chunks ``rank, rank + workers, ...`` of the subsampled text (the
    subsampling is drawn from the epoch's seed, so every worker sees the same text). Returns the loss sum and
    count, the words kept and the last learning rate."""
    import torch

    cfg, corpus = st.cfg, st.corpus
    workers = max(1, cfg.workers)
    kept = np.random.default_rng([cfg.seed, epoch]).random(corpus.words) < st.keep[corpus.ids]
    rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
    ids = torch.from_numpy(corpus.ids[kept].astype(np.int64))
    sentence = corpus.sentence[kept]
    n = int(ids.numel())
    total = corpus.words * cfg.epochs
    loss_sum, loss_n, lr = 0.0, 0, cfg.alpha
    step = (_skipgram_window_chunk if cfg.sg and cfg.shared_negatives else
            _skipgram_compiled_chunk if cfg.sg and cfg.compile else _skipgram_chunk if cfg.sg else _cbow_chunk)
    for chunk, start in enumerate(range(0, n, CHUNK_WORDS)):
        if chunk % workers != rank:
            continue
        stop = min(n, start + CHUNK_WORDS)
        # the rate at this chunk, by raw words seen (word2vec.c counts words before subsampling)
        frac = (epoch * corpus.words + corpus.words * (start / max(n, 1))) / total
        lr = cfg.alpha - (cfg.alpha - cfg.min_alpha) * frac
        pos, valid = context_positions(sentence, start, stop, cfg.window, rng)
        s, k = step(ids, start, pos, valid, st.w_in, st.w_out, st.table, cfg, lr, gen)
        loss_sum, loss_n = loss_sum + s, loss_n + k
        if rank == 0:  # the main process shows the progress of all (the workers move at about the same rate)
            st.bar.update(workers * corpus.words * (stop - start) / max(n, 1), loss=loss_sum / max(loss_n, 1), lr=lr)
    return loss_sum, loss_n, n, lr


def _hogwild_epoch(st: _State, epoch: int) -> tuple[float, int, int, float]:
    """One epoch on ``workers`` processes (fork) updating the shared matrices without locks (Hogwild, as
    word2vec.c's threads do); the main process is worker 0."""
    import multiprocessing as mp
    import traceback

    import torch

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()

    def work(rank: int) -> None:
        try:
            torch.set_num_threads(1)
            queue.put(("ok", _epoch(st, epoch, rank)))
        except BaseException:  # noqa: BLE001 - any failure of the worker goes back to the parent
            queue.put(("error", traceback.format_exc()))
        finally:
            os._exit(0)  # skip the parent's atexit handlers and buffered output

    procs = [ctx.Process(target=work, args=(r,), daemon=True) for r in range(1, st.cfg.workers)]
    for p in procs:
        p.start()
    try:
        results = [_epoch(st, epoch, 0)]
    finally:
        for p in procs:
            p.join()
    while not queue.empty():
        status, value = queue.get()
        if status == "error":
            raise RuntimeError(f"a word2vec worker failed:\n{value}")
        results.append(value)
    if len(results) != st.cfg.workers:
        raise RuntimeError(f"{st.cfg.workers - len(results)} word2vec worker(s) died (out of memory?)")
    return (sum(r[0] for r in results), sum(r[1] for r in results), results[0][2], min(r[3] for r in results))


def batch_pairs(batch_size: int, vocab_size: int) -> int:
    """The pairs updated at once: ``batch_size``, but at most half the vocabulary (at least 32), so a row repeats
    in a batch about once on average. A small vocabulary with a large batch sums hundreds of updates into each
    row per step and collapses every vector onto one direction (seen with 20 words and 2048 pairs)."""
    return max(1, min(batch_size, max(32, vocab_size // 2)))


def _negatives(table, shape: tuple[int, ...], gen):
    import torch

    return table[torch.randint(0, table.numel(), shape, generator=gen)]


LOSS_EVERY = 8  # the loss (for the log only) is measured on every 8th batch: it costs as much as a gather


def _pair_update(w_in, w_out, cen, ctx, negs, valid, lr):
    """One batch of skip-gram pairs written elementwise (gather, dot, sigmoid, scatter), for ``torch.compile``:
    inductor fuses each gather into its use and each scatter with the values it adds, so the (pairs x 6 x dim)
    intermediates of the eager path are never written out. ``valid`` (0/1 per pair) pads the last batch to the
    compiled shape; ``lr`` is a 0-d tensor, so a new rate does not recompile. Returns the batch's loss sum."""
    import torch
    import torch.nn.functional as F

    targets = torch.cat([cen[:, None], negs], dim=1)
    h = w_in[ctx]
    out = w_out[targets]
    score = (out * h[:, None, :]).sum(-1)
    label = torch.zeros_like(score)
    label[:, 0] = 1.0
    keep = torch.cat([torch.ones_like(cen[:, None], dtype=torch.bool), negs != cen[:, None]], dim=1)
    g = (label - torch.sigmoid(score)) * lr * keep * valid[:, None]
    w_in.index_add_(0, ctx, (g[:, :, None] * out).sum(1))
    w_out.index_add_(0, targets.reshape(-1), (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
    loss = F.softplus(-score[:, 0]) + F.softplus(score[:, 1:]).sum(1)
    return (loss * valid).sum()


_COMPILED: dict[str, object] = {}


def compiled_pair_update():
    """``torch.compile`` of :func:`_pair_update` (static shapes), built once per process."""
    import torch

    if "pair" not in _COMPILED:
        _COMPILED["pair"] = torch.compile(_pair_update, dynamic=False)
    return _COMPILED["pair"]


def _skipgram_compiled_chunk(ids, start, pos, valid, w_in, w_out, table, cfg, lr, gen) -> tuple[float, int]:
    """The pairs of a chunk through the compiled update, in batches of one fixed size (the last one padded)."""
    import torch

    rows, cols = np.nonzero(valid)
    centre = ids[torch.from_numpy(rows + start)]
    context = ids[torch.from_numpy(pos[rows, cols])]
    step = batch_pairs(cfg.batch_size, w_in.shape[0])
    update = compiled_pair_update()
    rate = torch.tensor(lr, dtype=torch.float32)
    loss, count = 0.0, 0
    for b in range(0, centre.numel(), step):
        cen, ctx = centre[b:b + step], context[b:b + step]
        m = cen.numel()
        ok = torch.ones(step)
        if m < step:  # pad with pairs of word 0 that update nothing
            pad = torch.zeros(step - m, dtype=cen.dtype)
            cen, ctx = torch.cat([cen, pad]), torch.cat([ctx, pad])
            ok[m:] = 0.0
        s = update(w_in, w_out, cen, ctx, _negatives(table, (step, cfg.negative), gen), ok, rate)
        if (b // step) % LOSS_EVERY == 0:
            loss += float(s)
            count += m
    return loss, count


def _skipgram_chunk(ids, start, pos, valid, w_in, w_out, table, cfg, lr, gen) -> tuple[float, int]:
    """Every (centre, context) pair of the chunk in position order, ``batch_size`` at a time. As in word2vec.c the
    context word's input vector predicts the centre word (and noise words) through the output vectors."""
    import torch
    import torch.nn.functional as F

    rows, cols = np.nonzero(valid)
    centre = ids[torch.from_numpy(rows + start)]
    context = ids[torch.from_numpy(pos[rows, cols])]
    loss, count = 0.0, 0
    k = cfg.negative
    step = batch_pairs(cfg.batch_size, w_in.shape[0])
    for b in range(0, centre.numel(), step):
        cen, ctx = centre[b:b + step], context[b:b + step]
        m = cen.numel()
        targets = torch.cat([cen[:, None], _negatives(table, (m, k), gen)], dim=1)    # (m, k+1)
        h = w_in.index_select(0, ctx)                                             # (m, d)
        out = w_out.index_select(0, targets.view(-1)).view(m, k + 1, -1)          # (m, k+1, d)
        score = torch.bmm(out, h.unsqueeze(2)).squeeze(2)                         # (m, k+1)
        label = torch.zeros_like(score)
        label[:, 0] = 1.0
        g = (label - torch.sigmoid(score)) * lr
        g[:, 1:] *= targets[:, 1:] != cen[:, None]                               # a noise word equal to the word
        if (b // step) % LOSS_EVERY == 0:
            loss += float(F.softplus(-score[:, 0]).sum() + F.softplus(score[:, 1:]).sum())
            count += m
        dh = torch.bmm(g.unsqueeze(1), out).squeeze(1)
        w_out.index_add_(0, targets.view(-1), (g.unsqueeze(2) * h.unsqueeze(1)).view(m * (k + 1), -1))
        w_in.index_add_(0, ctx, dh)
    return loss, count


def _window_batches(ids, start, pos, valid, batch_size: int, vocab: int):
    """Batches of whole windows: ``(batch index, centres (m,), contexts (m, 2w), context mask (m, 2w))`` for the
    centres of a chunk with at least one context word; ~4 context words per centre, so a batch holds about as
    many pairs as a pair batch."""
    import torch

    rows = np.nonzero(valid.any(axis=1))[0]
    centre_all = ids[torch.from_numpy(rows + start)]
    ctx_all = ids[torch.from_numpy(pos[rows])]                                  # (n, 2w)
    mask_all = torch.from_numpy(valid[rows]).to(torch.float32)
    step = max(1, batch_pairs(batch_size, vocab) // 4)
    for i, b in enumerate(range(0, centre_all.numel(), step)):
        yield i, centre_all[b:b + step], ctx_all[b:b + step], mask_all[b:b + step]


def _skipgram_window_chunk(ids, start, pos, valid, w_in, w_out, table, cfg, lr, gen) -> tuple[float, int]:
    """Skip-gram with the noise words shared by the context words of one centre (Ji et al. 2016, pWord2Vec): the
    (contexts x targets) scores of a window are one small matrix product, and each output row is gathered once per
    window instead of once per pair."""
    import torch
    import torch.nn.functional as F

    loss, count = 0.0, 0
    k = cfg.negative
    for b, cen, ctx, mask in _window_batches(ids, start, pos, valid, cfg.batch_size, w_in.shape[0]):
        m, c = ctx.shape
        targets = torch.cat([cen[:, None], _negatives(table, (m, k), gen)], dim=1)       # (m, k+1)
        h = w_in.index_select(0, ctx.reshape(-1)).view(m, c, -1)                        # (m, c, d)
        out = w_out.index_select(0, targets.view(-1)).view(m, k + 1, -1)               # (m, k+1, d)
        score = torch.bmm(h, out.transpose(1, 2))                                      # (m, c, k+1)
        label = torch.zeros(m, 1, k + 1)
        label[:, :, 0] = 1.0
        g = (label - torch.sigmoid(score)) * lr
        g *= mask.unsqueeze(2)
        g[:, :, 1:] *= (targets[:, 1:] != cen[:, None]).unsqueeze(1)
        if b % LOSS_EVERY == 0:
            lm = F.softplus(-score[:, :, 0]) + F.softplus(score[:, :, 1:]).sum(2)
            loss += float((lm * mask).sum())
            count += int(mask.sum())
        w_in.index_add_(0, ctx.reshape(-1), torch.bmm(g, out).view(m * c, -1))
        w_out.index_add_(0, targets.view(-1), torch.bmm(g.transpose(1, 2), h).view(m * (k + 1), -1))
    return loss, count


def _cbow_chunk(ids, start, pos, valid, w_in, w_out, table, cfg, lr, gen) -> tuple[float, int]:
    """CBOW: the mean of a centre's context vectors predicts it; each context word gets the whole error (as
    word2vec.c and gensim's cbow_mean=1 do)."""
    import torch
    import torch.nn.functional as F

    loss, count = 0.0, 0
    k = cfg.negative
    for b, cen, ctx, mask in _window_batches(ids, start, pos, valid, cfg.batch_size, w_in.shape[0]):
        m, c = ctx.shape
        vec = w_in.index_select(0, ctx.reshape(-1)).view(m, c, -1) * mask.unsqueeze(2)
        h = vec.sum(1) / mask.sum(1, keepdim=True)
        targets = torch.cat([cen[:, None], _negatives(table, (m, k), gen)], dim=1)
        out = w_out.index_select(0, targets.view(-1)).view(m, k + 1, -1)
        score = torch.bmm(out, h.unsqueeze(2)).squeeze(2)
        label = torch.zeros_like(score)
        label[:, 0] = 1.0
        g = (label - torch.sigmoid(score)) * lr
        g[:, 1:] *= targets[:, 1:] != cen[:, None]
        if b % LOSS_EVERY == 0:
            loss += float(F.softplus(-score[:, 0]).sum() + F.softplus(score[:, 1:]).sum())
            count += m
        dh = torch.bmm(g.unsqueeze(1), out).squeeze(1)                       # (m, d)
        w_out.index_add_(0, targets.view(-1), (g.unsqueeze(2) * h.unsqueeze(1)).view(m * (k + 1), -1))
        w_in.index_add_(0, ctx.reshape(-1), (mask.unsqueeze(2) * dh.unsqueeze(1)).view(m * c, -1))
    return loss, count


__all__ = ["context_positions", "keep_probabilities", "noise_table", "train_word2vec", "train_word2vec_corpus"]
