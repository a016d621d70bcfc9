"""Prompt test suites: cases with variables and assertions, repeats, pass rates with intervals, regressions.

A suite is a YAML file::

    name: qa-suite
    prompt: qa@production        # default for `lmstack prompt test` (--prompt overrides)
    repeats: 3                   # runs per case (sampling makes them differ)
    min_pass_rate: 1.0           # a case passes when this share of its runs pass (per case: override)
    cases:
      - id: capital
        vars: {question: "What is the capital of France?"}
        assert:
          - contains: Paris                   # a string or a list (all must appear); ignore_case: true
          - not_contains: London
          - regex: "^[A-Z]"                   # re.search
          - equals: "Paris."                  # after strip (strip: false keeps whitespace)
          - json_schema: {type: object, required: [answer]}   # the output parses as JSON and validates
          - metric: rougeL                    # lmstack.eval's metric registry
            reference: "The capital of France is Paris."
            min: 0.3                          # or max: for a lower-is-better metric
          - rubric: "Is the answer correct and polite?"       # an LLM judge (lmstack.eval.judges.bias)
            min: 7                            # mean score over `samples` judge samples; range [1, 10]
            samples: 3

A case gives ``vars`` (rendered through the prompt template) or ``messages`` (sent as they are, no template:
the hook for attack suites). One run of a case passes when every assertion passes.

Statistics. Per case: ``k`` of ``n`` runs passed; pass rate ``k/n`` with a Wilson score interval (Wilson
1927; sound at small ``n`` and at 0 or 1, unlike the normal approximation) and the sample variance of the
pass indicator (``k(n-k)/(n(n-1))``). Scores of metric and rubric assertions: mean and variance over runs.

Comparison (:func:`compare`) of a baseline and a candidate (two prompt versions, or two models) case by case:
a case regresses when the candidate's pass count is significantly lower (one-sided Fisher exact test at
``alpha``) or when the baseline met the case's ``min_pass_rate`` and the candidate does not. ``lmstack prompt
test`` exits 1 on a regression (or, without a baseline, when a case is below its pass rate) and 2 on bad input.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.eval.stats import wilson_interval  # the one Wilson interval (re-exported for suites)
from lmstack.extras import require
from lmstack.prompts.template import PromptTemplate, RenderedPrompt, as_messages

Messages = list[dict[str, str]]
Generator = Callable[[Messages], str]

KINDS = ("equals", "contains", "not_contains", "regex", "json_schema", "metric", "rubric")
OPTIONS = {"equals": {"strip", "ignore_case"}, "contains": {"ignore_case"}, "not_contains": {"ignore_case"},
           "regex": set(), "json_schema": set(), "metric": {"reference", "min", "max", "options"},
           "rubric": {"min", "range", "samples", "temperature"}}
SUITE_KEYS = {"name", "prompt", "repeats", "min_pass_rate", "alpha", "confidence", "cases", "description"}
CASE_KEYS = {"id", "vars", "messages", "assert", "min_pass_rate", "description"}


# ------------------------------------------------------------------------------------------- statistics


def fisher_less(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """One-sided Fisher exact p-value that ``b`` passes less often than ``a`` (P[X <= k_b], X hypergeometric:
    ``k_a + k_b`` passes among ``n_a + n_b`` runs, ``n_b`` of them drawn for b)."""
    total, passes = n_a + n_b, k_a + k_b
    denom = math.comb(total, n_b)
    lo = max(0, passes - n_a)
    return min(1.0, sum(math.comb(passes, x) * math.comb(total - passes, n_b - x)
                        for x in range(lo, k_b + 1)) / denom)


def pass_variance(k: int, n: int) -> float:
    """Sample variance of ``n`` pass/fail indicators with ``k`` passes (0 for one run)."""
    return k * (n - k) / (n * (n - 1)) if n > 1 else 0.0


# ------------------------------------------------------------------------------------------------ suite


@dataclass
class Case:
    id: str
    asserts: list[dict[str, Any]]
    vars: dict[str, Any] = field(default_factory=dict)
    messages: Messages | None = None
    min_pass_rate: float | None = None


@dataclass
class Suite:
    name: str
    cases: list[Case]
    prompt: str | None = None
    repeats: int = 1
    min_pass_rate: float = 1.0
    alpha: float = 0.05
    confidence: float = 0.95


def _rate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _check_assert(a: Any, where: str) -> dict[str, Any]:
    if not isinstance(a, Mapping):
        raise ConfigError(f"{where}: an assertion is a mapping such as {{contains: text}}")
    kinds = [k for k in a if k in KINDS]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(KINDS)} (got {', '.join(map(str, a)) or 'none'})")
    kind = kinds[0]
    extra = sorted(set(a) - {kind} - OPTIONS[kind])
    if extra:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(extra)} for {kind}; "
                          f"options: {', '.join(sorted(OPTIONS[kind])) or '(none)'}")
    value = a[kind]
    if kind in ("equals", "regex", "rubric") and not isinstance(value, str):
        raise ConfigError(f"{where}: {kind} expects a string")
    if kind in ("contains", "not_contains") and not (isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
        raise ConfigError(f"{where}: {kind} expects a string or a list of strings")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{where}: regex {value!r} does not compile: {e}") from None
    if kind == "json_schema":
        jsonschema = require("jsonschema", "a json_schema assertion")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: json_schema expects a schema object")
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"{where}: not a valid JSON Schema: {e.message}") from None
    if kind == "metric":
        from lmstack.eval.metrics import check_options, get_metric

        spec = get_metric(str(value))
        if spec.needs == "references" and "reference" not in a:
            raise ConfigError(f"{where}: metric {value!r} needs a reference")
        if ("min" in a) == ("max" in a):
            raise ConfigError(f"{where}: metric {value!r}: give min (higher is better) or max, one of them")
        check_options(spec, dict(a.get("options") or {}))
    if kind == "rubric":
        lo, hi = a.get("range", [1, 10])
        if "min" not in a or not lo <= a["min"] <= hi:
            raise ConfigError(f"{where}: rubric needs min, a score in its range [{lo}, {hi}]")
    return dict(a)


def suite_from_dict(data: Any, where: str = "suite") -> Suite:
    """A :class:`Suite` from parsed YAML, every field checked (errors name the case and field)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'cases'")
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; keys: {', '.join(sorted(SUITE_KEYS))}")
    rows = data.get("cases")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{where}: 'cases' must be a non-empty list")
    repeats = data.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"{where}: repeats must be an integer >= 1, got {repeats!r}")
    cases, seen = [], set()
    for k, row in enumerate(rows):
        w = f"{where}: cases[{k}]"
        if not isinstance(row, Mapping):
            raise ConfigError(f"{w}: expected a mapping with id and assert")
        bad = sorted(set(row) - CASE_KEYS)
        if bad:
            raise ConfigError(f"{w}: unknown key(s) {', '.join(bad)}; keys: {', '.join(sorted(CASE_KEYS))}")
        cid = str(row.get("id", k))
        if cid in seen:
            raise ConfigError(f"{w}: duplicate id {cid!r}")
        seen.add(cid)
        w = f"{where}: case {cid!r}"
        asserts = row.get("assert")
        if not isinstance(asserts, list) or not asserts:
            raise ConfigError(f"{w}: 'assert' must be a non-empty list")
        variables = row.get("vars") or {}
        if not isinstance(variables, Mapping):
            raise ConfigError(f"{w}: 'vars' must be a mapping")
        messages = row.get("messages")
        if messages is not None:
            if row.get("vars"):
                raise ConfigError(f"{w}: give vars (through the prompt) or messages (sent as they are), not both")
            if not isinstance(messages, (str, list)):
                raise ConfigError(f"{w}: 'messages' must be a string or a list of {{role, content}}")
            try:
                messages = as_messages(messages)
            except (KeyError, TypeError):
                raise ConfigError(f"{w}: every message needs 'role' and 'content'") from None
        mpr = row.get("min_pass_rate")
        cases.append(Case(cid, [_check_assert(a, f"{w} assert[{i}]") for i, a in enumerate(asserts)],
                          dict(variables), messages, _rate(mpr, f"{w} min_pass_rate") if mpr is not None else None))
    return Suite(str(data.get("name", where)), cases, data.get("prompt"), repeats,
                 _rate(data.get("min_pass_rate", 1.0), f"{where}: min_pass_rate"),
                 _rate(data.get("alpha", 0.05), f"{where}: alpha"),
                 _rate(data.get("confidence", 0.95), f"{where}: confidence"))


def load_suite(path: str | Path) -> Suite:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such suite file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"{p}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    return suite_from_dict(data, str(p))


# ------------------------------------------------------------------------------------------------- run


@dataclass
class CaseResult:
    id: str
    n: int
    passes: int
    min_pass_rate: float
    ci: tuple[float, float]
    runs: list[dict[str, Any]]                 # per run: output, passed, checks
    checks: list[dict[str, Any]]               # per assertion: kind, pass rate, score mean/variance
    question: str = ""                         # the last user message sent (for judges)

    @property
    def pass_rate(self) -> float:
        return self.passes / self.n

    @property
    def variance(self) -> float:
        return pass_variance(self.passes, self.n)

    @property
    def ok(self) -> bool:
        return self.pass_rate >= self.min_pass_rate - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "n": self.n, "passes": self.passes, "pass_rate": self.pass_rate, "ci": list(self.ci),
                "variance": self.variance, "min_pass_rate": self.min_pass_rate, "ok": self.ok,
                "checks": self.checks, "runs": self.runs}


@dataclass
class SuiteResult:
    name: str
    label: str                                 # what ran: the prompt reference and/or model
    cases: list[CaseResult]
    confidence: float = 0.95

    @property
    def passes(self) -> int:
        return sum(c.passes for c in self.cases)

    @property
    def n(self) -> int:
        return sum(c.n for c in self.cases)

    @property
    def pass_rate(self) -> float:
        return self.passes / self.n

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.passes, self.n, self.confidence)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "passes": self.passes, "n": self.n,
                "pass_rate": self.pass_rate, "ci": list(self.ci), "ok": self.ok,
                "cases": [c.to_dict() for c in self.cases]}


def _contains(out: str, needles: str | list[str], ignore_case: bool) -> list[str]:
    """The needles that are missing from ``out``."""
    hay = out.lower() if ignore_case else out
    items = [needles] if isinstance(needles, str) else needles
    return [s for s in items if (s.lower() if ignore_case else s) not in hay]


def _check_one(a: dict[str, Any], out: str) -> tuple[bool, str]:
    """A rule assertion on one output: (passed, why it failed)."""
    if "equals" in a:
        x, y = (out.strip(), a["equals"].strip()) if a.get("strip", True) else (out, a["equals"])
        if a.get("ignore_case"):
            x, y = x.lower(), y.lower()
        return x == y, "" if x == y else f"expected {a['equals']!r}"
    if "contains" in a:
        missing = _contains(out, a["contains"], a.get("ignore_case", False))
        return not missing, f"missing {missing!r}" if missing else ""
    if "not_contains" in a:
        items = [a["not_contains"]] if isinstance(a["not_contains"], str) else a["not_contains"]
        present = [s for s in items if s not in _contains(out, items, a.get("ignore_case", False))]
        return not present, f"contains {present!r}" if present else ""
    if "regex" in a:
        ok = re.search(a["regex"], out) is not None
        return ok, "" if ok else f"no match for {a['regex']!r}"
    if "json_schema" in a:
        jsonschema = require("jsonschema", "a json_schema assertion")
        try:
            value = json.loads(out.strip())
        except json.JSONDecodeError as e:
            return False, f"not JSON ({e.msg} at char {e.pos})"
        errors = sorted(jsonschema.validators.validator_for(a["json_schema"])(a["json_schema"]).iter_errors(value),
                        key=lambda e: list(e.path))
        return not errors, f"schema: {errors[0].message}" if errors else ""
    raise AssertionError(a)   # scored kinds are handled in _score


def _question(messages: Messages) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def _score(a: dict[str, Any], outputs: list[str], messages: Messages, judge: Any) -> tuple[list[float | None], dict]:
    """Scores of a metric or rubric assertion on every output of a case (batched), and a summary."""
    if "metric" in a:
        from lmstack.eval.metrics import compute_metric

        ref = a.get("reference")
        r = compute_metric(a["metric"], outputs, [ref] * len(outputs) if ref is not None else None,
                           **dict(a.get("options") or {}))
        return [float(s) for s in r.per_item], {}
    from lmstack.eval.judges.bias import pointwise

    if judge is None:
        raise LmstackError(f"rubric assertion {a['rubric'][:40]!r}: no judge given (lmstack prompt test --judge "
                           f"RUN_OR_URL; run_suite(judge=...))")
    lo, hi = a.get("range", [1, 10])
    res = pointwise(judge, [_question(messages)] * len(outputs), outputs, a["rubric"], score_range=(lo, hi),
                    n_samples=int(a.get("samples", 1)), temperature=float(a.get("temperature", 0.7 if int(
                        a.get("samples", 1)) > 1 else 0.0)))
    return res.scores, {"judge_length_bias": res.summary["length_bias"],
                        "judge_mean_variance": res.summary["mean_variance"], "judge_failed": res.summary["failed"]}


def _threshold(a: dict[str, Any], score: float | None) -> tuple[bool, str]:
    if score is None or not math.isfinite(score):
        return False, "no score (a judge reply that did not parse, or an item the metric could not score)"
    if "max" in a:
        return score <= a["max"], "" if score <= a["max"] else f"score {score:.4g} > max {a['max']}"
    return score >= a["min"], "" if score >= a["min"] else f"score {score:.4g} < min {a['min']}"


def run_case(case: Case, generate: Generator, template: PromptTemplate | None = None, repeats: int = 1,
             min_pass_rate: float = 1.0, confidence: float = 0.95, judge: Any = None) -> CaseResult:
    """Run one case ``repeats`` times and check every assertion on every output."""
    if case.messages is not None:
        messages = case.messages
    elif template is not None:
        try:
            messages = template.render(case.vars).messages
        except LmstackError as e:
            raise LmstackError(f"case {case.id!r}: {e}") from None
    else:
        raise LmstackError(f"case {case.id!r}: has vars but no prompt template was given (and no messages)")
    outputs = []
    for _ in range(repeats):
        out = generate([dict(m) for m in messages])
        if not isinstance(out, str):
            raise LmstackError(f"case {case.id!r}: the generator returned {type(out).__name__}, not a string")
        outputs.append(out)
    table: list[list[tuple[bool, str]]] = []
    checks = []
    for a in case.asserts:
        kind = next(k for k in KINDS if k in a)
        extra: dict[str, Any] = {}
        if kind in ("metric", "rubric"):
            scores, extra = _score(a, outputs, messages, judge)
            col = [_threshold(a, s) for s in scores]
            ok_scores = [s for s in scores if s is not None and math.isfinite(s)]
            mean = sum(ok_scores) / len(ok_scores) if ok_scores else float("nan")
            var = (sum((s - mean) ** 2 for s in ok_scores) / (len(ok_scores) - 1)) if len(ok_scores) > 1 else 0.0
            extra = {"scores": scores, "score_mean": mean, "score_variance": var, **extra}
        else:
            col = [_check_one(a, out) for out in outputs]
        table.append(col)
        checks.append({"kind": kind, "target": str(a[kind])[:80], "pass_rate": sum(ok for ok, _ in col) / repeats,
                       **extra})
    runs = []
    for r, out in enumerate(outputs):
        fails = [f"{checks[j]['kind']}: {table[j][r][1]}" for j in range(len(table)) if not table[j][r][0]]
        runs.append({"output": out, "passed": not fails, "failures": fails})
    passes = sum(run["passed"] for run in runs)
    mpr = case.min_pass_rate if case.min_pass_rate is not None else min_pass_rate
    return CaseResult(case.id, repeats, passes, mpr, wilson_interval(passes, repeats, confidence), runs, checks,
                      _question(messages))


def run_suite(suite: Suite, generate: Generator, template: PromptTemplate | None = None, *,
              repeats: int | None = None, judge: Any = None, label: str = "") -> SuiteResult:
    """Run every case of ``suite``: ``generate(messages) -> str`` answers, ``template`` renders the cases'
    vars (cases with ``messages`` skip it), ``judge`` (an :class:`lmstack.eval.llm.LLM`) scores rubrics."""
    n = repeats if repeats is not None else suite.repeats
    if n < 1:
        raise ConfigError(f"repeats must be >= 1, got {n}")
    cases = [run_case(c, generate, template, n, suite.min_pass_rate, suite.confidence, judge) for c in suite.cases]
    return SuiteResult(suite.name, label, cases, suite.confidence)


def text_generator(fn: Callable[[str], str]) -> Generator:
    """A ``generate(messages)`` from a function of plain text (a completion model): the prompt's text form."""
    return lambda messages: fn(RenderedPrompt(messages).text)


# --------------------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    baseline: SuiteResult
    candidate: SuiteResult
    rows: list[dict[str, Any]]
    alpha: float

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["regression"]]

    @property
    def improvements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["improvement"]]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "candidate": self.candidate.to_dict(), "rows": self.rows,
                "alpha": self.alpha, "regressions": [r["id"] for r in self.regressions],
                "improvements": [r["id"] for r in self.improvements],
                "overall_p_value": fisher_less(self.baseline.passes, self.baseline.n, self.candidate.passes,
                                               self.candidate.n)}


def compare(baseline: SuiteResult, candidate: SuiteResult, alpha: float = 0.05) -> Comparison:
    """Case-by-case comparison; see the module docstring for what counts as a regression."""
    base = {c.id: c for c in baseline.cases}
    if set(base) != {c.id for c in candidate.cases}:
        raise DataError("compare: the two results ran different cases; run the same suite for both")
    rows = []
    for c in candidate.cases:
        b = base[c.id]
        p_worse = fisher_less(b.passes, b.n, c.passes, c.n)
        p_better = fisher_less(c.passes, c.n, b.passes, b.n)
        reasons = []
        if p_worse < alpha:
            reasons.append(f"pass rate fell {b.pass_rate:.2f} -> {c.pass_rate:.2f} (Fisher p={p_worse:.3g} < {alpha})")
        if b.ok and not c.ok:
            reasons.append(f"pass rate {c.pass_rate:.2f} fell below min_pass_rate {c.min_pass_rate:g}")
        rows.append({"id": c.id, "baseline": b.pass_rate, "candidate": c.pass_rate,
                     "delta": c.pass_rate - b.pass_rate, "p_value": p_worse, "regression": bool(reasons),
                     "improvement": p_better < alpha or (c.ok and not b.ok), "reason": "; ".join(reasons)})
    return Comparison(baseline, candidate, rows, alpha)


def judge_pairwise(cmp: Comparison, judge: Any, rubric: str) -> dict[str, Any]:
    """An LLM judge's side-by-side verdict on the two systems' outputs, run ``r`` of each case against run
    ``r`` of the other, with the bias controls of :func:`lmstack.eval.judges.bias.pairwise`: each pair is
    judged in both orders and counts only when both agree (else a tie); ``consistency_rate`` and
    ``first_position_rate`` (0.5 for an unbiased judge) and the length bias are reported."""
    from lmstack.eval.judges.bias import pairwise

    base = {c.id: c for c in cmp.baseline.cases}
    questions, cand_out, base_out = [], [], []
    for c in cmp.candidate.cases:
        b = base[c.id]
        for rc, rb in zip(c.runs, b.runs):
            questions.append(c.question)
            cand_out.append(rc["output"])
            base_out.append(rb["output"])
    res = pairwise(judge, questions, cand_out, base_out, rubric, swap=True)
    s = res.summary
    return {"rubric": rubric, "pairs": len(questions), "candidate_win_rate": s["win_rate_a"],
            "consistency_rate": s["consistency_rate"], "first_position_rate": s["first_position_rate"],
            "length_bias": s["length_bias"], "failed": s["failed"]}


# ----------------------------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def format_result(result: SuiteResult) -> str:
    """A Markdown table of one run: pass rate, Wilson interval and variance per case."""
    head = (f"**{result.name}** ({result.label}): {result.passes}/{result.n} runs pass ({_pct(result.pass_rate)}, "
            f"{int(result.confidence * 100)}% CI {_pct(result.ci[0])}-{_pct(result.ci[1])})")
    lines = [head, "",
             "| case | pass | rate | CI | variance | ok | first failure |", "|---|---|---|---|---|---|---|"]
    for c in result.cases:
        fail = next((r["failures"][0] for r in c.runs if r["failures"]), "")
        lines.append(f"| {c.id} | {c.passes}/{c.n} | {_pct(c.pass_rate)} | {_pct(c.ci[0])}-{_pct(c.ci[1])} | "
                     f"{c.variance:.3f} | {'yes' if c.ok else 'NO'} | {fail.replace('|', '/')[:80]} |")
    return "\n".join(lines) + "\n"


def format_comparison(cmp: Comparison) -> str:
    """Side by side: baseline vs candidate per case, regressions flagged."""
    b, c = cmp.baseline, cmp.candidate
    head = (f"baseline **{b.label}**: {_pct(b.pass_rate)} ({_pct(b.ci[0])}-{_pct(b.ci[1])}); candidate "
            f"**{c.label}**: {_pct(c.pass_rate)} ({_pct(c.ci[0])}-{_pct(c.ci[1])}); "
            f"{len(cmp.regressions)} regression(s), {len(cmp.improvements)} improvement(s)")
    lines = [head, "",
             "| case | baseline | candidate | delta | p (worse) | verdict |", "|---|---|---|---|---|---|"]
    for r in cmp.rows:
        verdict = "REGRESSION: " + r["reason"] if r["regression"] else "improved" if r["improvement"] else ""
        lines.append(f"| {r['id']} | {_pct(r['baseline'])} | {_pct(r['candidate'])} | {100 * r['delta']:+.0f} | "
                     f"{r['p_value']:.3g} | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ generators


def local_generator(model: Any, tokenizer: Any, max_new_tokens: int = 64, temperature: float = 0.8,
                    seed: int = 0, check_budget: bool = True, chat: bool = True) -> Generator:
    """``generate(messages)`` with a local lmstack model through its chat template (:func:`lmstack.infer.text.
    complete`). Sampling (``temperature > 0``) draws call ``k`` with seed ``seed + k``, so repeats differ and a
    rerun is identical; ``temperature=0`` is greedy (every repeat the same). ``check_budget``: a prompt that
    does not fit beside ``max_new_tokens`` in a decoder's context is an error (the engine would drop its
    beginning, the instruction, without a word). ``chat=False``: the prompt's text form as a plain completion
    (a base model without a chat template)."""
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import complete

    calls = [0]
    context = int(model.config.max_seq_len) if getattr(model.config, "arch", "decoder") == "decoder" else None

    def generate(messages: Messages) -> str:
        if check_budget and context is not None:
            RenderedPrompt(messages).check_budget(tokenizer, context, max_new_tokens, chat=chat)
        k = calls[0]
        calls[0] += 1
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                               temperature=temperature if temperature > 0 else 1.0, seed=seed + k)
        return complete(model, tokenizer, messages if chat else RenderedPrompt(messages).text, cfg).text

    return generate


def remote_generator(client: Any, max_tokens: int = 64, temperature: float = 0.8, seed: int = 0) -> Generator:
    """``generate(messages)`` with an OpenAI-compatible chat endpoint (:class:`lmstack.eval.llm.OpenAICompatible`
    in ``chat`` mode): the messages go as they are (the template's system turn and few-shot pairs intact), with
    the client's cache and retries. Call ``k`` sends ``seed + k`` (repeats differ where the server honours it)."""
    if getattr(client, "mode", "chat") != "chat":
        raise ConfigError("remote_generator: the client must be in 'chat' mode (messages, not a prompt string)")
    calls = [0]

    def generate(messages: Messages) -> str:
        k = calls[0]
        calls[0] += 1
        body = RenderedPrompt(messages).openai_request(client.model, max_tokens=max_tokens, temperature=temperature,
                                                       n=1, seed=seed + k)
        # the client's one request path (cache keyed by the body, retries, reply parsing); complete() takes
        # a prompt string, which would flatten the conversation
        return client.request(body)[0].text

    return generate


def import_generator(spec: str) -> Generator:
    """``MODULE:FUNC`` -> that function (``generate(messages) -> str``)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise LmstackError(f"--generator {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.backend:generate")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise LmstackError(f"--generator {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise LmstackError(f"--generator {spec!r}: {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise LmstackError(f"--generator {spec!r}: {attr!r} is not callable")
    return fn


def cli_test(args: Any, registry: Any) -> int:
    """``lmstack prompt test``: 0 pass, 1 failure/regression, 2 bad input (raised as LmstackError)."""
    from lmstack.runs import atomic_write_json

    suite = load_suite(args.suite)
    ref = args.prompt or suite.prompt
    needs_prompt = any(c.messages is None for c in suite.cases)
    if needs_prompt and not ref:
        raise LmstackError(f"{args.suite}: give --prompt NAME@VERSION (the suite names no prompt)")
    if args.generator and args.model:
        raise LmstackError("prompt test: give --model or --generator, not both")
    if not (args.generator or args.model):
        raise LmstackError("prompt test: give --model RUN (a local model) or --generator MODULE:FUNC")
    if getattr(args, "pairwise_rubric", None) and not (args.judge and (args.against or args.against_model)):
        raise LmstackError("prompt test: --pairwise-rubric needs --judge and a baseline (--against/--against-model)")
    if args.against_model and not args.model:
        raise LmstackError("prompt test: --against-model compares with --model; give --model too")
    template = registry.template(ref) if ref else None
    base_template = registry.template(args.against) if args.against else None
    judge = None
    if args.judge:
        from lmstack.eval.llm import load_llm

        judge = load_llm(args.judge)

    def generator(model_spec: str | None) -> Generator:
        if args.generator:
            return import_generator(args.generator)
        if model_spec and model_spec.startswith(("http://", "https://")):
            from lmstack.eval.llm import load_llm

            return remote_generator(load_llm(model_spec), args.max_new_tokens, args.temperature, args.seed)
        from lmstack.infer.text import load_run

        model, tok = load_run(model_spec)
        return local_generator(model, tok, args.max_new_tokens, args.temperature, args.seed,
                               chat=not args.plain)

    model_label = f" on {args.model}" if args.model else ""
    candidate = run_suite(suite, generator(args.model), template, repeats=args.repeats, judge=judge,
                          label=f"{ref or 'messages'}{model_label}")
    if not (args.against or args.against_model):
        out = {"result": candidate.to_dict()}
        text = format_result(candidate)
        code = 0 if candidate.ok else 1
    else:
        base_model = args.against_model or args.model
        baseline = run_suite(suite, generator(base_model), base_template or template, repeats=args.repeats,
                             judge=judge, label=f"{args.against or ref}" + (f" on {base_model}" if base_model
                                                                            else ""))
        cmp = compare(baseline, candidate, suite.alpha)
        out = cmp.to_dict()
        text = format_result(baseline) + "\n" + format_result(candidate) + "\n" + format_comparison(cmp)
        if args.pairwise_rubric:
            pw = out["pairwise"] = judge_pairwise(cmp, judge, args.pairwise_rubric)
            text += (f"\njudge, side by side ({pw['pairs']} pairs, both orders): candidate wins "
                     f"{_pct(pw['candidate_win_rate'])} (ties 0.5); consistency {_pct(pw['consistency_rate'])}, "
                     f"first-position wins {_pct(pw['first_position_rate'])}\n")
        code = 1 if cmp.regressions else 0
    if args.out:
        atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2, ensure_ascii=False) if args.json else text, end="" if not args.json else "\n")
    return code
