"""Edit distance and exact match.

Levenshtein distance uses the bit-parallel algorithm of Myers (1999) in Hyyrö's formulation: the
shorter sequence becomes a bit pattern (one bit per position, Python ints have no width limit) and each
element of the longer one updates the vertical delta vectors with a handful of integer operations, so
the cost is O(len(longer)) big-int steps instead of an O(n*m) table. Elements can be characters or
tokens (any hashable). Normalised distance is ``distance / max(len(a), len(b))``, as rapidfuzz defines it.

The metric runs on rapidfuzz's C++ kernel when it is installed (``engine="auto"``; it is ~100x faster
than any pure-Python loop), and on :func:`levenshtein_distance` otherwise or with ``engine="python"``;
the tests hold the two equal.
"""

from __future__ import annotations

import re
import string
from collections.abc import Hashable, Sequence

from lmstack.errors import ConfigError
from lmstack.eval.metrics.base import MetricResult, empty_failures, mean, register


def levenshtein_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Unit-cost insert/delete/substitute distance between two sequences (strings or token lists)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[Hashable, int] = {}              # element -> bit mask of its positions in the pattern b
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, dist = mask, 0, m                  # vertical +1 / -1 deltas of the DP column; its last cell
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)                   # horizontal +1 deltas (negative ints: infinite 1 bits, masked below)
        mh = pv & xh
        if ph & last:
            dist += 1
        elif mh & last:
            dist -= 1
        ph = (ph << 1) | 1                     # the top row of the DP grows by one per element of a
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return dist


_WS = re.compile(r"\s+")


def _units(text: str, level: str) -> Sequence[Hashable]:
    if level == "char":
        return text
    if level == "token":
        return text.split()
    raise ConfigError(f"levenshtein option 'level': expected 'char' or 'token', got {level!r}")


def _distance_fn(engine: str):
    if engine not in ("auto", "python", "rapidfuzz"):
        raise ConfigError(f"levenshtein option 'engine': expected auto, python or rapidfuzz, got {engine!r}")
    if engine != "python":
        try:
            from rapidfuzz.distance import Levenshtein

            return Levenshtein.distance
        except ImportError:
            if engine == "rapidfuzz":
                raise ConfigError("levenshtein engine 'rapidfuzz' needs the package: "
                                  'pip install "lmstack[eval]"') from None
    return levenshtein_distance


def _batched(preds: list[str], refs: list[str], level: str, normalize: bool) -> list[float] | None:
    """All pairs in one rapidfuzz call (one reference per item); None when rapidfuzz lacks ``cpdist``."""
    try:
        from rapidfuzz.distance import Levenshtein
        from rapidfuzz.process import cpdist
    except ImportError:
        return None
    a = [_units(p, level) for p in preds]
    b = [_units(r, level) for r in refs]
    scorer = Levenshtein.normalized_distance if normalize else Levenshtein.distance
    import numpy as np

    return [float(x) for x in cpdist(a, b, scorer=scorer, dtype=np.float64 if normalize else np.int64)]


@register("levenshtein", scale="edits (0-1 when normalize=True)", higher_is_better=False)
def levenshtein(predictions: list[str], references: list[list[str]], sources=None, *, level: str = "char",
                normalize: bool = False, engine: str = "auto", on_empty: str = "record") -> MetricResult:
    """Levenshtein edit distance per item (min over references); corpus score = mean. Lower is better.

    ``level``: ``char`` or ``token`` (whitespace tokens); ``normalize``: divide by the longer length (0-1);
    ``engine``: ``auto`` (rapidfuzz if installed), ``python`` (our bit-parallel code) or ``rapidfuzz``.
    """
    failures = empty_failures(predictions, on_empty)
    distance = _distance_fn(engine)
    if distance is not levenshtein_distance and all(len(r) == 1 for r in references):
        per_item = _batched(predictions, [r[0] for r in references], level, normalize)
        if per_item is not None:
            return MetricResult("levenshtein", mean(per_item), per_item,
                                {"level": level, "normalize": normalize, "engine": "rapidfuzz"}, failures,
                                higher_is_better=False)
    per_item = []
    for pred, refs in zip(predictions, references):
        a = _units(pred, level)
        best = None
        for ref in refs:
            b = _units(ref, level)
            d = distance(a, b)
            value = (d / max(len(a), len(b)) if max(len(a), len(b)) else 0.0) if normalize else float(d)
            best = value if best is None else min(best, value)
        per_item.append(best)
    return MetricResult("levenshtein", mean(per_item), per_item,
                        {"level": level, "normalize": normalize, "engine": getattr(distance, "__module__", engine)},
                        failures, higher_is_better=False)


def normalize_answer(text: str, ignore_case: bool = True, ignore_punctuation: bool = True,
                     ignore_articles: bool = False) -> str:
    """Lower-case, strip punctuation (and English articles, SQuAD style), squeeze whitespace."""
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    return _WS.sub(" ", text).strip()


@register("exact_match")
def exact_match(predictions: list[str], references: list[list[str]], sources=None, *, ignore_case: bool = True,
                ignore_punctuation: bool = True, ignore_articles: bool = False,
                on_empty: str = "record") -> MetricResult:
    """1.0 when the normalised prediction equals any normalised reference; corpus score = accuracy."""
    failures = empty_failures(predictions, on_empty)
    opts = dict(ignore_case=ignore_case, ignore_punctuation=ignore_punctuation, ignore_articles=ignore_articles)
    per_item = [float(any(normalize_answer(p, **opts) == normalize_answer(r, **opts) for r in refs))
                for p, refs in zip(predictions, references)]
    return MetricResult("exact_match", mean(per_item), per_item, dict(opts), failures)
