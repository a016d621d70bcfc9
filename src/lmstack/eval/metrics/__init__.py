"""The metrics registry and ``compute_metric``: every metric behind one call.

    from lmstack.eval import compute_metric
    r = compute_metric("bleu", predictions, references)        # r.score (corpus), r.per_item, r.details
    r = compute_metric("rougeL", preds, refs, use_stemmer=True)
    r = compute_metric("perplexity", texts, model=model, tokenizer=tok)

Metric modules register themselves on import (:func:`lmstack.eval.metrics.base.register`); the heavy
ones (model-based) are imported only when first asked for.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from lmstack.errors import ConfigError, DataError
from lmstack.eval.metrics.base import METRICS, MetricResult, MetricSpec, as_references, as_texts

MODULES = ("text", "ngram", "meteor", "model_based", "bertscore", "bleurt")

__all__ = ["compute_metric", "MetricResult", "list_metrics", "get_metric"]


def _load_all() -> None:
    for name in MODULES:
        importlib.import_module(f"lmstack.eval.metrics.{name}")


def list_metrics() -> dict[str, MetricSpec]:
    _load_all()
    return dict(METRICS)


def get_metric(name: str) -> MetricSpec:
    _load_all()
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


def compute_metric(name: str, predictions: Any, references: Any = None, sources: Any = None,
                   **options: Any) -> MetricResult:
    """Score ``predictions`` with metric ``name``: corpus score, per-item scores and details.

    ``references``: one string or one list of strings per prediction. ``sources``: one string per
    prediction (metrics that condition on the input, e.g. GPTScore). Options go to the metric
    (``lmstack eval metrics --list`` shows them). Mismatched counts raise :class:`lmstack.errors.DataError`.
    """
    spec = get_metric(name)
    preds = as_texts(predictions, "predictions")
    refs = as_references(references, len(preds)) if spec.needs == "references" else None
    if spec.needs != "references" and references is not None:
        refs = as_references(references, len(preds))
    srcs = None
    if sources is not None:
        srcs = as_texts(sources, "sources")
        if len(srcs) != len(preds):
            raise DataError(f"{len(preds)} predictions but {len(srcs)} sources: the counts must match")
    elif spec.needs == "sources":
        raise ConfigError(f"metric {name!r} needs sources (the inputs the predictions were generated from)")
    check_options(spec, options)
    return spec.fn(preds, refs, srcs, **options)


def metric_options(spec: MetricSpec) -> dict[str, Any]:
    """The keyword options of a metric with their defaults (``inspect.Parameter.empty`` = required)."""
    params = inspect.signature(spec.fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(spec: MetricSpec, options: dict[str, Any]) -> None:
    params = inspect.signature(spec.fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = metric_options(spec)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"metric {spec.name!r}: unknown option(s) {', '.join(unknown)}; "
                          f"options: {', '.join(known) or '(none)'}")
