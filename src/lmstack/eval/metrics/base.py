"""What every metric returns, the input checks they share, and the registry behind ``compute_metric``.

A metric is a function ``fn(predictions, references, sources, **options) -> MetricResult``. It gets
validated inputs: ``predictions`` a list of strings, ``references`` a list of lists of strings (one
list per item, so multi-reference data needs no special case), ``sources`` a list of strings or None.

Corpus scores that are not a mean of the per-item scores (BLEU, chrF, perplexity) carry sufficient
statistics per item (``item_stats``) and an ``aggregate`` function, so bootstrap intervals and paired
significance tests (:mod:`lmstack.eval.stats`) recompute them exactly on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError


@dataclass
class MetricResult:
    """A corpus score, one score per item, and the metric's details (precision/recall, signature, options).

    ``failures`` lists items that could not be scored as asked (``{"index", "reason"}``), e.g. empty
    predictions; they are kept in ``per_item`` with the value the reference library gives, never hidden.
    """

    name: str
    score: float
    per_item: list[float]
    details: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    higher_is_better: bool = True
    item_stats: np.ndarray | None = None                         # (N, k) sufficient statistics
    aggregate: Callable[[np.ndarray], float] | None = None       # (n, k) stats -> corpus score
    ci: tuple[float, float] | None = None                        # bootstrap interval, when asked

    def corpus_from(self, indices: np.ndarray) -> float:
        """The corpus score recomputed on the items ``indices`` (with repeats, for the bootstrap)."""
        if self.item_stats is not None and self.aggregate is not None:
            return float(self.aggregate(self.item_stats[indices]))
        values = np.asarray(self.per_item, dtype=np.float64)[indices]
        return float(values.mean()) if len(values) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "score": self.score, "per_item": self.per_item, "details": self.details,
               "failures": self.failures, "higher_is_better": self.higher_is_better}
        if self.ci is not None:
            out["ci"] = list(self.ci)
        return out


@dataclass
class MetricSpec:
    name: str
    fn: Callable[..., MetricResult]
    needs: str = "references"          # "references", "sources", "none" (model-only metrics such as perplexity)
    scale: str = "0-1"
    higher_is_better: bool = True
    doc: str = ""


METRICS: dict[str, MetricSpec] = {}


def register(name: str, needs: str = "references", scale: str = "0-1", higher_is_better: bool = True):
    """Decorator adding a metric function to the registry under ``name``."""
    def wrap(fn: Callable[..., MetricResult]) -> Callable[..., MetricResult]:
        doc = (fn.__doc__ or "").strip().splitlines()
        METRICS[name] = MetricSpec(name, fn, needs, scale, higher_is_better, doc[0] if doc else "")
        return fn
    return wrap


def as_texts(values: Any, what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise DataError(f"{what}: expected a list of strings, got {type(values).__name__}")
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise DataError(f"{what}[{i}]: expected a string, got {type(v).__name__}")
    return out


def as_references(references: Any, n: int) -> list[list[str]]:
    """One list of references per item: ``["a", "b"]`` -> ``[["a"], ["b"]]``; lists of lists pass through."""
    if references is None:
        raise DataError("this metric needs references (references=None)")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DataError(f"references: expected a list, got {type(references).__name__}")
    if len(references) != n:
        raise DataError(f"{n} predictions but {len(references)} references: the counts must match "
                        f"(one reference, or one list of references, per prediction)")
    out = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else list(r) if isinstance(r, Sequence) else None
        if refs is None or not refs or not all(isinstance(x, str) for x in refs):
            raise DataError(f"references[{i}]: expected a string or a non-empty list of strings")
        if not any(x.strip() for x in refs):
            raise DataError(f"references[{i}] is empty: an empty reference cannot be scored against; "
                            f"drop the item or fix the data")
        out.append(refs)
    return out


def empty_failures(predictions: list[str], on_empty: str) -> list[dict[str, Any]]:
    """Empty predictions: recorded as per-item failures (``on_empty='record'``) or an error (``'error'``)."""
    if on_empty not in ("record", "error"):
        raise ConfigError(f"on_empty: expected 'record' or 'error', got {on_empty!r}")
    empty = [i for i, p in enumerate(predictions) if not p.strip()]
    if empty and on_empty == "error":
        raise DataError(f"{len(empty)} empty prediction(s), first at index {empty[0]} (on_empty='error')")
    return [{"index": i, "reason": "empty prediction"} for i in empty]


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
