"""lmstack.eval: how you know whether a model, a prompt or a pipeline is good.

    from lmstack.eval import compute_metric
    compute_metric("bleu", predictions, references).score          # 0-100, sacreBLEU semantics
    compute_metric("rougeL", predictions, references).per_item      # rouge-score F-measures

Layout: ``metrics/`` (string, n-gram, model-based metrics behind :func:`compute_metric`), ``stats.py``
(bootstrap intervals, paired significance), ``llm.py`` (the ``LLM`` client: local model or an
OpenAI-compatible endpoint), ``judges/`` (G-Eval, DAG, SelfCheckGPT, pairwise/pointwise with bias
controls), ``harness.py`` + ``sandbox.py`` (benchmarks: multiple choice, exact match, pass@k, perplexity),
``correlate.py`` (meta-evaluation against human ratings), ``cli.py`` (``lmstack eval ...``).
"""

from __future__ import annotations

from lmstack.eval.metrics import compute_metric, get_metric, list_metrics
from lmstack.eval.metrics.base import MetricResult

__all__ = ["compute_metric", "MetricResult", "list_metrics", "get_metric"]
