"""Rewards for online RL: verifiable answers, the reasoning format, code that passes tests, reward models,
weighted sums, and the bookkeeping that keeps a failing reward out of the loss.

A reward function is ``fn(responses: list[str], items: list[dict]) -> list[float]``: one score per response,
``items[i]`` the prompt row it answers (``answer`` for numeric tasks, ``tests`` for code, ``prompt`` for a
reward model). The response is the generated text only (the prompt is not repeated in it).

The reasoning template (what the format reward checks and the numeric rewards' strict extraction reads)::

    <think>
    ...the working, free text...
    </think>
    #### 42

i.e. a ``<think>...</think>`` block first, then the final answer on a line of its own after ``####`` (the
GSM8K convention), nothing after it. Whitespace around the parts is free.

Numeric answers are compared after :func:`lmstack.eval.harness.normalize_number` (the evaluation layer's
rule: commas, ``$`` and a trailing period dropped, ``18.00 == 18``), with two extractions reported apart:

- **strict**: the number after the *last* ``####`` (``$``, commas, sign, decimals allowed, a trailing
  period or spaces tolerated), only when nothing but whitespace follows it: the required format;
- **lenient**: the last number anywhere in the response (what a grader that forgives the format finds).

A reward function that raises, returns the wrong number of scores, or returns NaN/inf for a sample is
*counted* (:class:`RewardStats`) and that sample's reward is NaN: the trainers give it no gradient (its
advantage is 0 and its tokens are masked out) and never put NaN into a loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[[list[str], list[dict[str, Any]]], list[float]]

_NUM = r"-?\$?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_STRICT = re.compile(r"####\s*(" + _NUM + r")\s*\.?\s*\Z")
_ANY_NUMBER = re.compile(_NUM)
_TEMPLATE = re.compile(r"\A\s*<think>(.+?)</think>\s*####\s*(" + _NUM + r")\s*\.?\s*\Z", re.DOTALL)


def _canon(text: str) -> str | None:
    """The evaluation layer's number normalisation, after our own clean-up of sign and currency."""
    from lmstack.eval.harness import normalize_number

    t = text.replace("\u2212", "-").replace(" ", "")
    neg = t.count("-") % 2 == 1
    t = t.replace("-", "").replace("$", "")
    if not any(ch.isdigit() for ch in t):
        return None
    out = normalize_number(("-" if neg else "") + t)
    return "0" if out == "-0" else out


def extract_strict(text: str) -> str | None:
    """The answer in the required format (``#### N`` at the very end), normalised; None when absent."""
    m = _STRICT.search(text.replace("\u2212", "-"))
    return _canon(m.group(1)) if m else None


def extract_lenient(text: str) -> str | None:
    """The last number anywhere in ``text``, normalised; None when there is none."""
    found = _ANY_NUMBER.findall(text.replace("\u2212", "-"))
    found = [f for f in found if any(ch.isdigit() for ch in f)]
    return _canon(found[-1]) if found else None


def gsm8k_answer(solution: str) -> str:
    """The reference answer of a GSM8K solution (``... #### 1,234``), normalised; raises if it has none."""
    ans = extract_strict(solution)
    if ans is None:
        raise ValueError(f"no '#### N' answer at the end of {solution[-60:]!r}")
    return ans


def answer_of(item: dict[str, Any]) -> str:
    """The normalised reference answer of a prompt row (``answer``: a number, or a GSM8K solution)."""
    a = item["answer"]
    if isinstance(a, (int, float)):
        return _canon(str(a)) or str(a)
    a = str(a)
    return gsm8k_answer(a) if "####" in a else (_canon(a) or a.strip())


def correct_strict(responses: list[str], items: list[dict[str, Any]]) -> list[float]:
    """1.0 where the strictly extracted answer equals the reference, else 0.0."""
    return [float(extract_strict(r) == answer_of(it)) for r, it in zip(responses, items)]


def correct_lenient(responses: list[str], items: list[dict[str, Any]]) -> list[float]:
    """1.0 where the last number in the response equals the reference, else 0.0."""
    return [float(extract_lenient(r) == answer_of(it)) for r, it in zip(responses, items)]


def format_reward(responses: list[str], items: list[dict[str, Any]] | None = None) -> list[float]:
    """1.0 for the full template (a non-empty ``<think>`` block, then ``#### N`` and nothing else), 0.5 for a
    non-empty ``<think>...</think>`` block without that answer line, 0.0 otherwise (an empty thought too)."""
    out = []
    for r in responses:
        m = _TEMPLATE.search(r)
        if m and m.group(1).strip():
            out.append(1.0)
        elif re.search(r"<think>\s*\S.*?</think>", r, re.DOTALL):
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def extract_code(text: str) -> str:
    """The code of a response: the first fenced block (```python ... ```), else the text after ``</think>``."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, re.DOTALL)
    if m:
        return m.group(1)
    return text.split("</think>")[-1]


def code_reward(timeout_s: float = 5.0, workers: int = 2) -> RewardFn:
    """1.0 where the response's code followed by the row's ``tests`` (asserts) exits cleanly in the
    evaluation layer's sandbox (:func:`lmstack.eval.sandbox.run_many`), else 0.0."""

    def reward(responses: list[str], items: list[dict[str, Any]]) -> list[float]:
        from lmstack.eval.sandbox import run_many

        programs = []
        for r, it in zip(responses, items):
            tests = it["tests"]
            tests = "\n".join(tests) if isinstance(tests, (list, tuple)) else str(tests)
            programs.append(f"{it.get('prefix', '')}{extract_code(r)}\n\n{tests}\n")
        return [float(res.passed) for res in run_many(programs, workers=workers, timeout_s=timeout_s)]

    reward.__name__ = "code"
    return reward


def reward_model_reward(scorer: Any) -> RewardFn:
    """Scores from a reward model: ``scorer.score(prompts, responses)`` (or ``scorer(prompts, responses)``)
    -> floats, with ``prompts[i] = items[i]["prompt"]`` (a string or chat messages)."""
    score = getattr(scorer, "score", scorer)

    def reward(responses: list[str], items: list[dict[str, Any]]) -> list[float]:
        return [float(s) for s in score([it["prompt"] for it in items], list(responses))]

    reward.__name__ = "reward_model"
    return reward


# --------------------------------------------------------------------------------------------------------
# sums of rewards, with failures counted


@dataclass
class RewardStats:
    """What went wrong while scoring, per reward function: samples that raised / were NaN, the first error."""

    failed: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    scored: int = 0

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())

    def add(self, name: str, n: int, error: str | None = None) -> None:
        if n:
            self.failed[name] = self.failed.get(name, 0) + n
            if error and name not in self.first_error:
                self.first_error[name] = error

    def summary(self) -> str:
        """One line for the run's log: which reward failed on how many samples, and why."""
        if not self.failed:
            return f"rewards: all {self.scored} samples scored"
        parts = [f"{name} failed on {n} of {self.scored} samples"
                 + (f" (first: {self.first_error[name]})" if name in self.first_error else "")
                 for name, n in sorted(self.failed.items())]
        return "rewards: " + "; ".join(parts) + "; those samples got no gradient"


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _one(fn: RewardFn, response: str, item: dict[str, Any]) -> tuple[float, str | None]:
    try:
        v = float(next(iter(fn([response], [item]))))
    except Exception as e:  # noqa: BLE001 -- a user's reward function may raise anything: isolate this sample
        return math.nan, f"{type(e).__name__}: {e}"[:200]
    return (v, None) if math.isfinite(v) else (math.nan, f"returned {v}")


def score_one(fn: RewardFn, responses: list[str], items: list[dict[str, Any]], stats: RewardStats | None = None,
              name: str | None = None) -> list[float]:
    """``fn`` on the batch, NaN (counted in ``stats``) where it raised or gave a non-finite value. A batch call
    that raises (or returns the wrong count) is retried sample by sample, so one bad sample costs only itself."""
    name = name or _name(fn)
    errors: list[str] = []
    try:
        values = [float(v) for v in fn(list(responses), list(items))]
        if len(values) != len(responses):
            raise ValueError(f"returned {len(values)} scores for {len(responses)} responses")
    except Exception:  # noqa: BLE001 -- any failure of the batch call: retry sample by sample
        pairs = [_one(fn, r, it) for r, it in zip(responses, items)]
        values = [v for v, _ in pairs]
        errors = [e for _, e in pairs if e]
    out = [v if math.isfinite(v) else math.nan for v in values]
    bad = sum(1 for v in out if math.isnan(v))
    if bad and not errors:
        errors = ["returned NaN/inf"]
    if stats is not None:
        stats.add(name, bad, errors[0] if errors else None)
    return out


def combine(rewards: Sequence[tuple[RewardFn, float]], responses: list[str], items: list[dict[str, Any]],
            stats: RewardStats | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum ``sum_k w_k r_k`` per response (NaN when any term is NaN) and each term's scores."""
    stats = stats if stats is not None else RewardStats()
    stats.scored += len(responses)
    parts: dict[str, list[float]] = {}
    total = [0.0] * len(responses)
    for fn, w in rewards:
        name = _name(fn)
        while name in parts:
            name += "_"
        scores = score_one(fn, responses, items, stats, name)
        parts[name] = scores
        total = [t + w * s for t, s in zip(total, scores)]   # NaN propagates: the sample is skipped
    return total, parts


def default_rewards(correct: float = 1.0, lenient: float = 0.0, fmt: float = 0.1) -> list[tuple[RewardFn, float]]:
    """Exact-match (strict) + optional lenient exact-match + the format reward, with these weights."""
    out: list[tuple[RewardFn, float]] = []
    if correct:
        out.append((correct_strict, correct))
    if lenient:
        out.append((correct_lenient, lenient))
    if fmt:
        out.append((format_reward, fmt))
    return out


def exact_match(responses: list[str], items: list[dict[str, Any]]) -> dict[str, float]:
    """Held-out accuracy with each extraction: ``{"exact_match_strict", "exact_match_lenient"}``."""
    n = max(len(responses), 1)
    return {"exact_match_strict": sum(correct_strict(responses, items)) / n,
            "exact_match_lenient": sum(correct_lenient(responses, items)) / n}
