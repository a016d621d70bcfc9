"""Intrinsic evaluation: the Google analogy set (Mikolov et al. 2013) and WordSim-353 (Finkelstein et al. 2002).

Both files ship in the ``gensim`` package's test data (``gensim/test/test_data/questions-words.txt`` and
``wordsim353.tsv``); :func:`gensim_data` finds them without importing gensim, and returns None where it is not
installed. The rules are gensim's ``evaluate_word_analogies`` / ``evaluate_word_pairs`` (``tests/test_embed.py``
checks the numbers are equal on the same vectors):

- only the ``restrict_vocab`` most frequent words take part; a question or pair with any other word is skipped
  (and counted in ``oov_ratio``);
- words are compared upper-cased (``case_insensitive``), the most frequent case variant standing for a word;
- an analogy's answer is the best-scoring word that is none of the three question words (3CosAdd, or 3CosMul
  with ``method="mul"``); WordSim-353 is the Spearman correlation of cosine similarity with the human scores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from lmstack.embed.vectors import WordVectors, analogy_scores
from lmstack.errors import DataError

ANALOGIES = "questions-words.txt"
WORDSIM = "wordsim353.tsv"


def gensim_data(name: str) -> Path | None:
    """The path of a file of gensim's test data, or None where gensim (or the file) is absent."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    return path if path.is_file() else None


def _ok_vocab(wv: WordVectors, restrict_vocab: int, case_insensitive: bool) -> dict[str, int]:
    keys = wv.words[:restrict_vocab]
    # reversed, so the most frequent of several case variants wins (as gensim does)
    return {(k.upper() if case_insensitive else k): i for i, k in reversed(list(enumerate(keys)))}


def analogy_accuracy(wv: WordVectors, path: str | os.PathLike | None = None, restrict_vocab: int = 300_000,
                     case_insensitive: bool = True, method: str = "add", batch: int = 0) -> dict:
    """Accuracy on an analogy file (``: section`` lines, then ``a b c d`` per question: a is to b as c is to d).
    Returns ``accuracy`` (None when no question is in the vocabulary), ``correct``, ``total``, ``questions``,
    ``oov_ratio`` (percent, as gensim) and per-section ``[correct, total]``."""
    path = Path(path) if path else gensim_data(ANALOGIES)
    if path is None:
        raise DataError(f"analogy set: {ANALOGIES} not found; install gensim (its test data holds it) or give a path")
    ok = _ok_vocab(wv, restrict_vocab, case_insensitive)
    questions, sections, section = [], {}, None
    n_lines = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(": "):
            section = line[2:].strip()
            sections[section] = [0, 0]
            continue
        parts = [w.upper() if case_insensitive else w for w in line.split()]
        if len(parts) != 4 or section is None:
            continue
        n_lines += 1
        if all(p in ok for p in parts):
            questions.append((section, *parts))
    unit = wv.unit[:restrict_vocab]
    words = [w.upper() if case_insensitive else w for w in wv.words[:restrict_vocab]]
    correct = 0
    # questions scored at once: at most 2^25 scores (128 MB of float32) whatever the vocabulary
    batch = batch or max(1, min(1024, (1 << 25) // max(len(words), 1)))
    for s in range(0, len(questions), batch):
        qs = questions[s:s + batch]
        a, b, c = ([ok[q[i]] for q in qs] for i in (1, 2, 3))
        scores = analogy_scores(unit, a, b, c, method)
        rows = np.arange(len(qs))
        for col in (a, b, c):
            scores[rows, col] = -np.inf
        k = min(5, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
        for q, cand in zip(qs, top):
            ignore = set(q[1:4])
            # gensim takes the first of the top 5 that is not a case variant of a question word
            predicted = next((words[j] for j in cand if words[j] not in ignore), words[cand[-1]])
            hit = predicted == q[4]
            correct += hit
            sections[q[0]][0] += hit
            sections[q[0]][1] += 1
    total = len(questions)
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total,
            "questions": n_lines, "oov_ratio": 100.0 * (n_lines - total) / max(n_lines, 1),
            "method": method, "sections": {k: v for k, v in sections.items() if v[1]}}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on ranks, tied values sharing their mean rank (as scipy's)."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1, dtype=np.float64)
    # mean rank over each run of equal values
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def word_similarity(wv: WordVectors, path: str | os.PathLike | None = None, restrict_vocab: int = 300_000,
                    case_insensitive: bool = True, delimiter: str = "\t") -> dict:
    """Spearman (and Pearson) correlation of cosine similarity with human judgements on a word-pair file
    (``word1<TAB>word2<TAB>score``, ``#`` comments). Returns ``spearman`` (None when no pair is in the
    vocabulary), ``pearson``, ``pairs`` used and ``oov_ratio`` (percent)."""
    path = Path(path) if path else gensim_data(WORDSIM)
    if path is None:
        raise DataError(f"word-similarity set: {WORDSIM} not found; install gensim (its test data holds it) or "
                        f"give a path")
    ok = _ok_vocab(wv, restrict_vocab, case_insensitive)
    gold, model, oov = [], [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = [w.upper() if case_insensitive else w for w in line.split(delimiter)]
        try:
            a, b, sim = parts[0], parts[1], float(parts[2])
        except (ValueError, IndexError):
            continue
        if len(parts) != 3:
            continue
        if a not in ok or b not in ok:
            oov += 1
            continue
        gold.append(sim)
        model.append(float(wv.unit[ok[a]] @ wv.unit[ok[b]]))
    n = len(gold)
    if n < 2:
        return {"spearman": None, "pearson": None, "pairs": n, "oov_ratio": 100.0 * oov / max(n + oov, 1)}
    g, m = np.asarray(gold), np.asarray(model)
    pearson = float(np.corrcoef(g, m)[0, 1])
    return {"spearman": spearman(g, m), "pearson": pearson, "pairs": n, "oov_ratio": 100.0 * oov / (n + oov)}


def evaluate(wv: WordVectors, restrict_vocab: int = 300_000) -> dict:
    """Both benchmarks from gensim's test data; ``{"skipped": reason}`` where gensim is not installed."""
    if gensim_data(ANALOGIES) is None or gensim_data(WORDSIM) is None:
        return {"skipped": "gensim is not installed (its test data holds the analogy and WordSim-353 sets)"}
    return {"analogy": analogy_accuracy(wv, restrict_vocab=restrict_vocab),
            "analogy_mul": analogy_accuracy(wv, restrict_vocab=restrict_vocab, method="mul"),
            "wordsim353": word_similarity(wv, restrict_vocab=restrict_vocab)}
