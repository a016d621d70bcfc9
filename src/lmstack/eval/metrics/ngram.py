"""BLEU and chrF (sacreBLEU is the engine, wrapped on purpose) and ROUGE (our implementation of rouge-score).

BLEU/chrF: sacreBLEU *is* the definition of comparable BLEU (its tokenizers, smoothing and signature),
so we call it rather than re-implement it. Per-item sufficient statistics (n-gram matches and totals,
lengths) are kept so the corpus score is recomputed exactly on bootstrap resamples; per-item scores are
sacreBLEU's sentence scores (BLEU with effective order, as ``sentence_bleu`` does).

ROUGE follows rouge-score 0.1.2: lower-case, every non ``[a-z0-9]`` character becomes a space, optional
Porter stemming of tokens longer than 3 characters (nltk's stemmer, as rouge-score uses), n-gram overlap
for ROUGE-N, the LCS for ROUGE-L, and the summary-level union LCS over newline-separated sentences for
ROUGE-Lsum. With several references the one with the best F-measure counts. Corpus score = mean F.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Any

import numpy as np

from lmstack.errors import ConfigError
from lmstack.eval.metrics.base import MetricResult, empty_failures, mean, register

# ------------------------------------------------------------------------------------------- BLEU / chrF


def _ref_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-item reference lists -> sacreBLEU's reference streams (None where an item has fewer refs)."""
    k = max(len(r) for r in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(k)]


def _sacrebleu_result(name: str, metric: Any, sentence_metric: Any, predictions: list[str],
                      references: list[list[str]], failures: list[dict]) -> MetricResult:
    streams = _ref_streams(references)
    stats = np.asarray(metric._extract_corpus_statistics(predictions, streams), dtype=np.float64)

    def aggregate(s: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(s.sum(0).tolist()).score)

    corpus = metric._compute_score_from_stats(stats.sum(0).tolist())
    per_item = [float(sentence_metric.sentence_score(p, refs).score) for p, refs in zip(predictions, references)]
    details: dict[str, Any] = {"signature": str(metric.get_signature())}
    for key in ("precisions", "bp", "sys_len", "ref_len"):
        if hasattr(corpus, key):
            details[key] = getattr(corpus, key)
    return MetricResult(name, float(corpus.score), per_item, details, failures, item_stats=stats,
                        aggregate=aggregate)


@register("bleu", scale="0-100")
def bleu(predictions: list[str], references: list[list[str]], sources=None, *, tokenize: str | None = None,
         smooth_method: str = "exp", smooth_value: float | None = None, lowercase: bool = False,
         max_ngram_order: int = 4, on_empty: str = "record") -> MetricResult:
    """Corpus BLEU (sacreBLEU semantics, 0-100); per item: sentence BLEU with effective order.

    ``tokenize``: 13a (default), none, zh, intl, char, ja-mecab, ko-mecab, flores101, flores200;
    ``smooth_method``: exp, floor, add-k, none.
    """
    from lmstack.extras import require

    BLEU = require("sacrebleu.metrics", "the bleu metric").BLEU

    failures = empty_failures(predictions, on_empty)
    opts = dict(tokenize=tokenize, smooth_method=smooth_method, smooth_value=smooth_value, lowercase=lowercase,
                max_ngram_order=max_ngram_order)
    try:
        corpus = BLEU(**opts)
        sentence = BLEU(**opts, effective_order=True)
    except Exception as e:  # sacrebleu raises plain exceptions for bad option values
        raise ConfigError(f"bleu options: {e}") from e
    return _sacrebleu_result("bleu", corpus, sentence, predictions, references, failures)


@register("chrf", scale="0-100")
def chrf(predictions: list[str], references: list[list[str]], sources=None, *, char_order: int = 6,
         word_order: int = 0, beta: int = 2, lowercase: bool = False, whitespace: bool = False,
         eps_smoothing: bool = False, on_empty: str = "record") -> MetricResult:
    """Corpus chrF (sacreBLEU semantics, 0-100); ``word_order=2`` gives chrF++. Per item: sentence chrF."""
    from lmstack.extras import require

    CHRF = require("sacrebleu.metrics", "the chrf metric").CHRF

    failures = empty_failures(predictions, on_empty)
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase,
                  whitespace=whitespace, eps_smoothing=eps_smoothing)
    return _sacrebleu_result("chrf", metric, metric, predictions, references, failures)


@register("chrf++", scale="0-100")
def chrf_pp(predictions: list[str], references: list[list[str]], sources=None, **options: Any) -> MetricResult:
    """chrF++ (chrF with word bigrams, ``word_order=2``)."""
    options.setdefault("word_order", 2)
    result = chrf(predictions, references, **options)
    result.name = "chrf++"
    return result


# ------------------------------------------------------------------------------------------------- ROUGE

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1)
def _porter():
    from lmstack.extras import require

    PorterStemmer = require("nltk.stem.porter", "ROUGE's Porter stemmer").PorterStemmer

    stemmer = PorterStemmer()
    return lru_cache(maxsize=200_000)(stemmer.stem)


def rouge_tokenize(text: str, stem: bool = False) -> list[str]:
    """rouge-score's tokenizer: lower-case, non-alphanumerics to spaces, optional stemming of tokens > 3 chars."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if stem:
        stemmer = _porter()
        tokens = [stemmer(t) if len(t) > 3 else t for t in tokens]
        tokens = [t for t in tokens if t and _NON_ALNUM.search(t) is None]
    return tokens


def _prf(hits: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    p = hits / n_pred if n_pred else 0.0
    r = hits / n_ref if n_ref else 0.0
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def _ngram_prf(ref: list[str], pred: list[str], n: int) -> tuple[float, float, float]:
    rc = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    pc = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
    hits = sum(min(c, pc[g]) for g, c in rc.items())
    p = hits / max(sum(pc.values()), 1)
    r = hits / max(sum(rc.values()), 1)
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def _lcs_table(ref: list[str], pred: list[str]) -> list[list[int]]:
    table = [[0] * (len(pred) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        row, prev = table[i], table[i - 1]
        for j, p in enumerate(pred, 1):
            row[j] = prev[j - 1] + 1 if r == p else (row[j - 1] if row[j - 1] > prev[j] else prev[j])
    return table


def _lcs_indices(ref: list[str], pred: list[str]) -> list[int]:
    """Reference positions of one LCS, read back the way rouge-score does (ties move up, not left)."""
    t = _lcs_table(ref, pred)
    i, j, out = len(ref), len(pred), []
    while i > 0 and j > 0:
        if ref[i - 1] == pred[j - 1]:
            out.append(i - 1)
            i -= 1
            j -= 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def lcs_length(a: list[str], b: list[str]) -> int:
    """LCS length, bit-parallel (Allison & Dix 1986; Hyyro 2004): one big-int update per element of ``a``.

    Bit i of ``v`` is 0 where b[i] ends a match counted in the current LCS row; the LCS length is the
    number of zero bits. Much faster than the O(n*m) table in pure Python.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def _lcs_prf(ref: list[str], pred: list[str]) -> tuple[float, float, float]:
    if not ref or not pred:
        return 0.0, 0.0, 0.0
    return _prf(lcs_length(ref, pred), len(pred), len(ref))


def _lsum_prf(ref_sents: list[list[str]], pred_sents: list[list[str]]) -> tuple[float, float, float]:
    """Summary-level LCS (ROUGE paper 3.2) with ROUGE-1.5.5's guard against counting a token twice."""
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not ref_sents or not pred_sents or not m or not n:
        return 0.0, 0.0, 0.0
    ref_left, pred_left = Counter(), Counter()
    for s in ref_sents:
        ref_left.update(s)
    for s in pred_sents:
        pred_left.update(s)
    hits = 0
    for r in ref_sents:
        union = sorted(set().union(*(_lcs_indices(r, c) for c in pred_sents)))
        for tok in (r[k] for k in union):
            if ref_left[tok] > 0 and pred_left[tok] > 0:
                hits += 1
                ref_left[tok] -= 1
                pred_left[tok] -= 1
    return _prf(hits, n, m)


def rouge_prf(rouge_type: str, ref: str, pred: str, stem: bool = False) -> tuple[float, float, float]:
    """(precision, recall, F) of one ROUGE type for one reference/prediction pair."""
    if rouge_type == "rougeLsum":
        sents = lambda t: [rouge_tokenize(s, stem) for s in t.split("\n") if s]  # noqa: E731
        return _lsum_prf(sents(ref), sents(pred))
    r, p = rouge_tokenize(ref, stem), rouge_tokenize(pred, stem)
    if rouge_type == "rougeL":
        return _lcs_prf(r, p)
    m = re.fullmatch(r"rouge([1-9])", rouge_type)
    if not m:
        raise ConfigError(f"unknown ROUGE type {rouge_type!r}; use rouge1..rouge9, rougeL, rougeLsum")
    return _ngram_prf(r, p, int(m.group(1)))


def rouge(predictions: list[str], references: list[list[str]], rouge_type: str, use_stemmer: bool = False,
          on_empty: str = "record") -> MetricResult:
    failures = empty_failures(predictions, on_empty)
    prf = []
    for pred, refs in zip(predictions, references):
        scores = [rouge_prf(rouge_type, ref, pred, use_stemmer) for ref in refs]
        prf.append(max(scores, key=lambda s: s[2]) if len(scores) > 1 else scores[0])  # first max, as np.argmax
    arr = np.asarray(prf, dtype=np.float64).reshape(-1, 3)
    details = {"precision": mean(arr[:, 0]), "recall": mean(arr[:, 1]), "use_stemmer": use_stemmer,
               "per_item_precision": arr[:, 0].tolist(), "per_item_recall": arr[:, 1].tolist()}
    return MetricResult(rouge_type, mean(arr[:, 2]), arr[:, 2].tolist(), details, failures)


def _make_rouge(rouge_type: str) -> None:
    def fn(predictions, references, sources=None, *, use_stemmer: bool = False, on_empty: str = "record"):
        return rouge(predictions, references, rouge_type, use_stemmer, on_empty)
    fn.__doc__ = f"{rouge_type} F-measure (rouge-score semantics, 0-1); ``use_stemmer`` for Porter stemming."
    register(rouge_type)(fn)


for _t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    _make_rouge(_t)
