"""Reading predictions/references from files, running several metrics at once, tables, and the
evaluation stage of ``lmstack speedrun``.

    results, report_md = evaluate_run(model, tokenizer, heldout_texts, prompts=..., references=...)
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.eval.metrics import compute_metric
from lmstack.eval.metrics.base import MetricResult


def read_column(path: str | os.PathLike, field: str | None = None) -> list[str]:
    """One text per item from ``.txt`` (a line each), ``.jsonl`` (``field``), ``.json`` (list) or ``.csv`` (column)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{p}: expected a JSON list")
        elif suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = p.read_text(encoding="utf-8").splitlines()
            if not rows:
                raise DataError(f"{p}: no items (the file is empty)")
            return rows
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None
    if not rows:
        raise DataError(f"{p}: no items (the file is empty)")
    if isinstance(rows[0], str):
        return [str(r) for r in rows]
    field = field or "text"
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{p}: row {i} has no field {field!r} (fields: {keys}); choose one with --*-field")
        out.append("" if row[field] is None else str(row[field]))
    return out


def run_metrics(names: Sequence[str], predictions: Sequence[str], references: Any = None, sources: Any = None,
                options: dict[str, dict[str, Any]] | None = None, ci: bool = False, n_resamples: int = 1000,
                seed: int = 0) -> dict[str, MetricResult]:
    from lmstack.eval.stats import bootstrap_ci

    out = {}
    for name in names:
        res = compute_metric(name, predictions, references, sources, **(options or {}).get(name, {}))
        if ci:
            res.ci = bootstrap_ci(res, n_resamples=n_resamples, seed=seed)
        out[name] = res
    return out


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def metrics_table(results: dict[str, MetricResult], compare: dict[str, dict[str, Any]] | None = None) -> str:
    head = "| metric | score | 95% CI | items | failures |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        ci = f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]" if r.ci else ""
        lines.append(f"| {name} | {_fmt(r.score)} | {ci} | {len(r.per_item)} | {len(r.failures)} |")
    if compare:
        lines += ["", "| metric | delta (B - A) | p (approx. randomisation) | p (paired bootstrap) |",
                  "| --- | --- | --- | --- |"]
        for name, c in compare.items():
            lines.append(f"| {name} | {_fmt(c['delta'])} | {c['p_permutation']:.4f} | {c['p_bootstrap']:.4f} |")
    return "\n".join(lines)


def evaluate_run(model: Any, tokenizer: Any, heldout_texts: Sequence[str], *, prompts: Sequence[str] = (),
                 references: Sequence[str] = (), mc_items: Sequence[dict[str, Any]] = (), max_new_tokens: int = 48,
                 max_heldout: int = 200, seed: int = 0) -> tuple[dict[str, Any], str]:
    """The speedrun's evaluation stage: held-out perplexity and bits-per-byte, a small multiple-choice
    benchmark (``mc_items``: ``{"query", "choices", "gold"}``), and classical metrics (BLEU, chrF,
    ROUGE-L, METEOR when WordNet is installed) on greedy continuations of ``prompts`` vs ``references``.
    Returns ``(results, report_md)``; every part is skipped cleanly when its inputs are empty.
    """
    import numpy as np

    from lmstack.runtime import seed_everything

    seed_everything(seed)
    results: dict[str, Any] = {}
    lines = ["### Evaluation", ""]
    texts = [t for t in heldout_texts if t.strip()][:max_heldout]
    if texts:
        ppl = compute_metric("perplexity", texts, model=model, tokenizer=tokenizer)
        results["heldout"] = {"perplexity": ppl.score, "bits_per_byte": ppl.details["bits_per_byte"],
                              "tokens": ppl.details["tokens"], "documents": len(texts)}
        lines += [f"- held-out perplexity **{ppl.score:.3f}**, bits per byte **{ppl.details['bits_per_byte']:.4f}** "
                  f"({ppl.details['tokens']:,} tokens, {len(texts)} documents)"]
    if mc_items:
        from lmstack.eval.lm import loglikelihoods

        ctx = [d["query"] for d in mc_items for _ in d["choices"]]
        cont = [" " + c for d in mc_items for c in d["choices"]]
        scored = iter(loglikelihoods(model, tokenizer, ctx, cont))
        acc = acc_norm = 0
        for d in mc_items:
            ll = np.asarray([next(scored).logprob for _ in d["choices"]])
            acc += int(ll.argmax() == d["gold"])
            acc_norm += int((ll / np.asarray([len(c) for c in d["choices"]])).argmax() == d["gold"])
        chance = float(np.mean([1 / len(d["choices"]) for d in mc_items]))
        results["multiple_choice"] = {"acc": acc / len(mc_items), "acc_norm": acc_norm / len(mc_items),
                                      "items": len(mc_items), "chance": chance}
        lines += [f"- multiple choice ({len(mc_items)} items): acc **{acc / len(mc_items):.3f}**, acc_norm "
                  f"**{acc_norm / len(mc_items):.3f}** (chance {chance:.3f})"]
    if prompts:
        if len(prompts) != len(references):
            raise DataError(f"evaluate_run: {len(prompts)} prompts but {len(references)} references")
        from lmstack.eval.llm import LocalLLM

        outputs = [r[0].text for r in LocalLLM(model, tokenizer).complete(list(prompts), max_tokens=max_new_tokens)]
        from lmstack.extras import available

        names = ["bleu", "chrf", "rougeL"] if available("sacrebleu") and available("nltk") else []
        if not names:
            results["metrics_skipped"] = 'BLEU/chrF/ROUGE need the eval extra: pip install "lmstack[eval]"'
        try:
            from lmstack.eval.metrics.wordnet import load_wordnet

            load_wordnet()
            names.append("meteor")
        except Exception as e:  # METEOR is optional here; the report says why it is missing
            results["meteor_skipped"] = str(e)
        scores = {n: r.score for n, r in run_metrics(names, outputs, list(references)).items()}
        results["generation"] = {"metrics": scores, "items": len(prompts),
                                 "samples": [{"prompt": p, "output": o, "reference": r}
                                             for p, o, r in list(zip(prompts, outputs, references))[:3]]}
        lines += ["- generation vs reference (" + str(len(prompts)) + " prompts): "
                  + ", ".join(f"{n} {v:.3f}" for n, v in scores.items())]
        if "metrics_skipped" in results:
            lines += [f"  ({results['metrics_skipped']})"]
        if "meteor_skipped" in results:
            lines += [f"  (METEOR skipped: {results['meteor_skipped']})"]
    if len(lines) == 2:
        lines.append("- nothing to evaluate (no held-out text, benchmark items or prompts)")
    return results, "\n".join(lines) + "\n"
