"""Metrics computed under a language model: perplexity, bits-per-byte, GPTScore.

Perplexity is ``exp(total NLL / total tokens)`` over the corpus (per item: over that text); it depends
on the tokenizer, so models with different tokenizers compare on **bits per byte** instead:
``total NLL / (ln 2 * total UTF-8 bytes)`` (see nanochat's ``loss_eval``). GPTScore (Fu et al. 2023)
is the mean log-probability of the prediction's tokens given an instruction and the source (or the
reference): ``template.format(instruction=..., source=...)`` followed by the prediction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmstack.errors import ConfigError
from lmstack.eval.metrics.base import MetricResult, empty_failures, mean, register


def _need_model(name: str, model: Any, tokenizer: Any) -> None:
    if model is None or tokenizer is None:
        raise ConfigError(f"metric {name!r} needs model= (an lmstack decoder) and tokenizer= (an lmstack tokenizer)")


def _ppl_aggregate(stats: np.ndarray) -> float:
    return math.exp(stats[:, 0].sum() / stats[:, 1].sum()) if stats[:, 1].sum() else float("nan")


def _bpb_aggregate(stats: np.ndarray) -> float:
    return stats[:, 0].sum() / (math.log(2) * stats[:, 2].sum()) if stats[:, 2].sum() else float("nan")


def _nll_result(name: str, predictions: list[str], model: Any, tokenizer: Any, max_length: int | None,
                stride: int | None, add_bos: bool | None, batch_size: int, on_empty: str) -> MetricResult:
    from lmstack.eval.lm import text_nll

    _need_model(name, model, tokenizer)
    failures = empty_failures(predictions, on_empty)
    nlls = text_nll(model, tokenizer, predictions, max_length, stride, add_bos, batch_size)
    stats = np.asarray([[r.nll, r.n_tokens, r.n_bytes] for r in nlls], dtype=np.float64).reshape(-1, 3)
    for i, r in enumerate(nlls):
        if r.n_tokens == 0 and not any(f["index"] == i for f in failures):
            failures.append({"index": i, "reason": "no token to score (text too short; try add_bos=True)"})
    agg = _ppl_aggregate if name == "perplexity" else _bpb_aggregate
    per_item = [agg(stats[i:i + 1]) if stats[i, 1] else float("nan") for i in range(len(nlls))]
    total_tokens = int(stats[:, 1].sum())
    details = {"tokens": total_tokens, "bytes": int(stats[:, 2].sum()),
               "nll_per_token": float(stats[:, 0].sum() / total_tokens) if total_tokens else float("nan"),
               "perplexity": _ppl_aggregate(stats), "bits_per_byte": _bpb_aggregate(stats),
               "max_length": max_length, "stride": stride}
    return MetricResult(name, agg(stats), per_item, details, failures, higher_is_better=False, item_stats=stats,
                        aggregate=agg)


@register("perplexity", needs="none", scale="tokens (lower is better)", higher_is_better=False)
def perplexity(predictions: list[str], references=None, sources=None, *, model: Any = None, tokenizer: Any = None,
               max_length: int | None = None, stride: int | None = None, add_bos: bool | None = None, batch_size: int = 8,
               on_empty: str = "record") -> MetricResult:
    """Token perplexity of the texts under a decoder (sliding window for long texts); details hold bits/byte."""
    return _nll_result("perplexity", predictions, model, tokenizer, max_length, stride, add_bos, batch_size, on_empty)


@register("bits_per_byte", needs="none", scale="bits (lower is better)", higher_is_better=False)
def bits_per_byte(predictions: list[str], references=None, sources=None, *, model: Any = None, tokenizer: Any = None,
                  max_length: int | None = None, stride: int | None = None, add_bos: bool | None = None, batch_size: int = 8,
                  on_empty: str = "record") -> MetricResult:
    """Bits per UTF-8 byte of the texts under a decoder: tokenizer-independent, so models compare."""
    return _nll_result("bits_per_byte", predictions, model, tokenizer, max_length, stride, add_bos, batch_size,
                       on_empty)


@register("gptscore", needs="none", scale="mean log-prob per token (higher is better)")
def gptscore(predictions: list[str], references: list[list[str]] | None = None, sources: list[str] | None = None, *,
             model: Any = None, tokenizer: Any = None, instruction: str = "",
             template: str = "{instruction}\n{source}\n", batch_size: int = 8,
             on_empty: str = "record") -> MetricResult:
    """GPTScore: mean log p(prediction token | instruction + source) under a decoder.

    Conditions on ``sources`` when given, else on the first reference (reference-based GPTScore).
    """
    from lmstack.eval.lm import loglikelihoods

    _need_model("gptscore", model, tokenizer)
    if sources is None and references is None:
        raise ConfigError("gptscore needs sources= (or references=) to condition on")
    failures = empty_failures(predictions, on_empty)
    conds = sources if sources is not None else [r[0] for r in references]  # type: ignore[index]
    keep = [i for i, p in enumerate(predictions) if p.strip()]
    contexts = [template.format(instruction=instruction, source=conds[i]) for i in keep]
    scored = loglikelihoods(model, tokenizer, contexts, [predictions[i] for i in keep], batch_size)
    per_item = [float("nan")] * len(predictions)
    for i, s in zip(keep, scored):
        per_item[i] = s.logprob / s.n_tokens
    return MetricResult("gptscore", mean([per_item[i] for i in keep]), per_item,
                        {"instruction": instruction, "template": template,
                         "conditioned_on": "sources" if sources is not None else "references"}, failures)
