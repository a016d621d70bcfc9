"""LLM-as-a-judge, pointwise and pairwise, with the controls that expose its biases.

- **Position bias** (pairwise): every pair is judged twice, A/B and B/A. A verdict counts only when both
  orders agree; otherwise the pair is a tie. ``consistency_rate`` is the share of pairs whose two
  verdicts agree; ``first_position_rate`` is how often the answer shown first wins a decisive verdict
  (0.5 for an unbiased judge).
- **Length bias**: Pearson and Spearman correlation of the score with the answer's length in words
  (pointwise), or of the verdict with the length difference (pairwise).
- **Sampling variance** (pointwise): ``n_samples`` scores per item at ``temperature``; mean and variance.
- **Prompt sensitivity**: :func:`prompt_sensitivity` re-judges with paraphrased rubrics and reports the
  per-item spread (max - min) and standard deviation of the scores across rubrics.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmstack.errors import DataError
from lmstack.eval.correlate import pearson, spearman
from lmstack.eval.judges.base import JudgeResult, parse_score
from lmstack.eval.llm import LLM

POINTWISE_PROMPT = """{rubric}

Question:
{question}

Answer:
{answer}

Rate the answer on a scale of {lo} to {hi}. Reply with the number only.
Score:"""

PAIRWISE_PROMPT = """{rubric}

Question:
{question}

Answer A:
{first}

Answer B:
{second}

Which answer is better? Reply with "A", "B" or "tie".
Verdict:"""

_VERDICT = re.compile(r"\b(A|B)\b|\b(tie)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a reply ("A", "Answer B is better", "Tie."), None when it names none."""
    m = _VERDICT.search(text.strip())
    if not m:
        return None
    return "tie" if m.group(2) else m.group(1).upper()


def _lengths(texts: Sequence[str]) -> np.ndarray:
    return np.asarray([len(t.split()) for t in texts], dtype=np.float64)


def _bias(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": int(keep.sum())}
    return {"pearson": pearson(x[keep], y[keep]), "spearman": spearman(x[keep], y[keep]), "n": int(keep.sum())}


def pointwise(llm: LLM, questions: Sequence[str], answers: Sequence[str], rubric: str,
              score_range: tuple[float, float] = (1, 10), n_samples: int = 1, temperature: float = 0.0,
              seed: int = 0, max_tokens: int = 8) -> JudgeResult:
    """Score each answer ``n_samples`` times; mean per item, variance, and the length-bias report."""
    if len(questions) != len(answers):
        raise DataError(f"pointwise judge: {len(questions)} questions but {len(answers)} answers")
    lo, hi = score_range
    prompts = [POINTWISE_PROMPT.format(rubric=rubric, question=q, answer=a, lo=lo, hi=hi)
               for q, a in zip(questions, answers)]
    replies = llm.complete(prompts, max_tokens=max_tokens, temperature=temperature, n=n_samples, seed=seed)
    scores: list[float | None] = []
    details, failures = [], []
    for i, samples in enumerate(replies):
        parsed = [parse_score(c.text, lo, hi) for c in samples]
        ok = [p for p in parsed if p is not None]
        if not ok:
            failures.append({"index": i, "reason": f"no score in {lo}-{hi}", "reply": samples[0].text[:200]})
        scores.append(float(np.mean(ok)) if ok else None)
        details.append({"samples": parsed, "variance": float(np.var(ok)) if ok else None,
                        "unparsed": len(parsed) - len(ok)})
    values = np.asarray([s if s is not None else np.nan for s in scores])
    variances = [d["variance"] for d in details if d["variance"] is not None]
    summary = {"length_bias": _bias(_lengths(answers), values),
               "mean_variance": float(np.mean(variances)) if variances else float("nan"),
               "n_samples": n_samples, "failed": len(failures)}
    return JudgeResult("pointwise", scores, details, failures, summary)


def prompt_sensitivity(llm: LLM, questions: Sequence[str], answers: Sequence[str], rubrics: Sequence[str],
                       **options: Any) -> dict[str, Any]:
    """Judge with each paraphrased rubric; the spread of each item's score across rubrics."""
    runs = [pointwise(llm, questions, answers, r, **options) for r in rubrics]
    table = np.asarray([[s if s is not None else np.nan for s in run.scores] for run in runs])  # (R, N)
    ok = np.isfinite(table).all(axis=0)
    spread = (table.max(axis=0) - table.min(axis=0))[ok]
    std = table.std(axis=0)[ok]
    return {"rubric_means": [run.score for run in runs], "mean_spread": float(spread.mean()) if ok.any() else float("nan"),
            "max_spread": float(spread.max()) if ok.any() else float("nan"),
            "mean_std": float(std.mean()) if ok.any() else float("nan"), "items": int(ok.sum()),
            "per_item_spread": [float(x) for x in (table.max(axis=0) - table.min(axis=0))]}


def pairwise(llm: LLM, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str], rubric: str,
             swap: bool = True, max_tokens: int = 8) -> JudgeResult:
    """Which of A and B is better, judged in both orders. Per-item score for A: 1 win, 0.5 tie, 0 loss."""
    if not len(questions) == len(answers_a) == len(answers_b):
        raise DataError(f"pairwise judge: {len(questions)} questions, {len(answers_a)} A answers, "
                        f"{len(answers_b)} B answers: the counts must match")
    n = len(questions)
    ab = [PAIRWISE_PROMPT.format(rubric=rubric, question=q, first=a, second=b)
          for q, a, b in zip(questions, answers_a, answers_b)]
    ba = [PAIRWISE_PROMPT.format(rubric=rubric, question=q, first=b, second=a)
          for q, a, b in zip(questions, answers_a, answers_b)] if swap else []
    replies = [r[0].text for r in llm.complete(ab + ba, max_tokens=max_tokens, temperature=0.0)]
    flip = {"A": "B", "B": "A", "tie": "tie", None: None}
    scores: list[float | None] = []
    details, failures = [], []
    first_wins = decisive = consistent = judged_twice = 0
    for i in range(n):
        v1 = parse_verdict(replies[i])
        v2 = flip[parse_verdict(replies[n + i])] if swap else v1   # back in A/B terms
        raw = [replies[i]] + ([replies[n + i]] if swap else [])
        if v1 is None or v2 is None:
            failures.append({"index": i, "reason": "verdict does not parse", "replies": [r[:200] for r in raw]})
            scores.append(None)
            details.append({"verdicts": [v1, v2], "replies": raw})
            continue
        for shown_first, verdict in (("A", v1), ("B", v2)) if swap else (("A", v1),):
            if verdict != "tie":
                decisive += 1
                first_wins += verdict == shown_first
        agree = v1 == v2
        judged_twice += 1
        consistent += agree
        final = v1 if agree else "tie"
        scores.append({"A": 1.0, "B": 0.0, "tie": 0.5}[final])
        details.append({"verdicts": [v1, v2], "consistent": agree, "winner": final})
    values = np.asarray([s if s is not None else np.nan for s in scores])
    summary = {"consistency_rate": consistent / judged_twice if judged_twice else float("nan"),
               "first_position_rate": first_wins / decisive if decisive else float("nan"),
               "win_rate_a": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
               "length_bias": _bias(_lengths(answers_a) - _lengths(answers_b), values),
               "failed": len(failures), "swapped": swap}
    return JudgeResult("pairwise", scores, details, failures, summary)
