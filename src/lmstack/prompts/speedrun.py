"""The speedrun's prompts stage: two versions of a prompt in a registry, a suite comparing them.

:func:`speedrun_prompts` registers two versions of a small documentation-question prompt in a fresh
registry (``OUT/prompts.sqlite``; v1 labelled ``production``: the bare question; v2 ``staging``: the question
under a system instruction asking for one sentence), exports it to ``OUT/registry/`` (the YAML a team would
review), runs a suite of ``cases`` held-out documentation questions (the SFT data's rule: stdlib docstrings,
rows :func:`lmstack.data.split.is_heldout` keeps out of training) ``repeats`` times each with the chat model,
and compares the two versions case by case (:func:`lmstack.prompts.suite.compare`).

Assertions per case: the reply says something (``regex: \\w{3,}``), leaks no chat markers (``not_contains``
``<|``), stays under 400 characters, and overlaps the docstring (ROUGE-L F >= ``min_rouge``, lmstack.eval's
metric). ``min_pass_rate`` per case defaults to 1/3 (one passing run of three): a tiny model is the subject.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.prompts.template import PromptTemplate

V1 = PromptTemplate(input="{{ question }}", name="doc-qa")
V2 = PromptTemplate(instruction="You explain Python standard-library functions. Answer in one short sentence.",
                    input="{{ question }}", name="doc-qa")


def heldout_questions(n: int, scan: int = 400) -> list[dict[str, str]]:
    """``n`` documentation questions the SFT stage did not train on (rows ``{instruction, output, source}``)."""
    from lmstack.data.split import is_heldout
    from lmstack.finetune.sft import default_sft_rows

    rows = [r for r in default_sft_rows(scan) if is_heldout(r["source"], 0.05)]
    return rows[:n]


def build_suite(rows: list[dict[str, str]], repeats: int, min_rouge: float, min_pass_rate: float) -> dict[str, Any]:
    cases = [{"id": r["source"].removeprefix("docstring:"), "vars": {"question": r["instruction"]},
              "assert": [{"regex": r"\w{3,}"}, {"not_contains": ["<|", "|>"]}, {"regex": r"^[\s\S]{0,400}$"},
                         {"metric": "rougeL", "reference": r["output"], "min": min_rouge}]} for r in rows]
    return {"name": "doc-qa", "prompt": "doc-qa@production", "repeats": repeats, "min_pass_rate": min_pass_rate,
            "cases": cases}


def speedrun_prompts(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, cases: int = 6, repeats: int = 3,
                     max_new_tokens: int = 48, temperature: float = 0.8, seed: int = 0, min_rouge: float = 0.1,
                     min_pass_rate: float = 1 / 3, rows: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Register two prompt versions, run the suite on both with ``model``, compare; a summary dict whose
    ``report`` is the Markdown section (also written to ``OUT/report.md``; full results in
    ``OUT/suite_results.json``). ``rows`` replaces the held-out questions (tests)."""
    from lmstack.prompts.registry import open_registry
    from lmstack.prompts.suite import (
        compare,
        format_comparison,
        format_result,
        local_generator,
        run_suite,
        suite_from_dict,
    )
    from lmstack.runs import atomic_write_json, atomic_write_text

    if not 1 <= cases <= 50 or repeats < 1:
        raise ConfigError(f"speedrun_prompts: cases must be in 1..50 and repeats >= 1, got {cases}, {repeats}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):   # a fresh registry each run: the stage is reproducible
        (out / f"prompts.sqlite{suffix}").unlink(missing_ok=True)
    reg = open_registry(out / "prompts.sqlite")
    v1 = reg.add("doc-qa", V1, author="speedrun", message="the bare question", label="production")
    v2 = reg.add("doc-qa", V2, author="speedrun", message="a system instruction asking for one sentence",
                 label="staging")
    exported = reg.export(out / "registry")
    rows = rows if rows is not None else heldout_questions(cases)
    suite = suite_from_dict(build_suite(rows[:cases], repeats, min_rouge, min_pass_rate), "doc-qa suite")
    # the same seeds for both versions: the comparison differs only in the prompt
    base = run_suite(suite, local_generator(model, tokenizer, max_new_tokens, temperature, seed),
                     reg.template("doc-qa@production"), label=v1.ref + " (production)")
    cand = run_suite(suite, local_generator(model, tokenizer, max_new_tokens, temperature, seed),
                     reg.template("doc-qa@staging"), label=v2.ref + " (staging)")
    cmp = compare(base, cand, suite.alpha)
    atomic_write_json(out / "suite_results.json", cmp.to_dict())
    seconds = time.perf_counter() - t0
    example = cand.cases[0].runs[0]["output"] if cand.cases else ""
    report = (
        "## Prompts\n\n"
        f"Registry `{out / 'prompts.sqlite'}`: `doc-qa` v1 (production, the bare question) and v2 (staging, a "
        f"system instruction), exported to `{out / 'registry'}/` for review. Suite: {len(suite.cases)} held-out "
        f"documentation questions x {repeats} sampled runs (temperature {temperature}); a run passes when the "
        f"reply is non-empty, leaks no chat markers, is under 400 characters and has ROUGE-L >= {min_rouge} "
        f"against the docstring; a case passes at >= {min_pass_rate:.2f} of its runs. Intervals: Wilson 95%; "
        f"regression: one-sided Fisher exact p < {suite.alpha} or falling below the case's pass rate.\n\n"
        + format_result(base) + "\n" + format_result(cand) + "\n" + format_comparison(cmp) +
        f"\nv2's first reply: {example[:200]!r}\n\nv1 -> v2 diff:\n\n```diff\n{v2.diff}```\n"
        f"\n{seconds:.1f} s. Rerun: `lmstack prompt test {out / 'suite.yaml'} --db {out / 'prompts.sqlite'} "
        f"--prompt doc-qa@staging --against doc-qa@production --model RUN`.\n")
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "suite.yaml", _suite_yaml(build_suite(rows[:cases], repeats, min_rouge, min_pass_rate)))
    return {"versions": [v1.ref, v2.ref], "labels": reg.labels("doc-qa"), "cases": len(suite.cases),
            "repeats": repeats, "baseline": _summary(base), "candidate": _summary(cand),
            "regressions": [r["id"] for r in cmp.regressions], "improvements": [r["id"] for r in cmp.improvements],
            "exported": [str(p) for p in exported], "seconds": round(seconds, 2), "report": report}


def _summary(r: Any) -> dict[str, Any]:
    return {"label": r.label, "passes": r.passes, "n": r.n, "pass_rate": r.pass_rate, "ci": list(r.ci),
            "cases_ok": sum(c.ok for c in r.cases)}


def _suite_yaml(data: dict[str, Any]) -> str:
    from lmstack.prompts.registry import dump_yaml

    return dump_yaml(data)


# Strings are ASCII-only and length-bounded, so the longest valid object is ~130 bytes and fits the token budget
# whatever the tokenizer (a token is at least one byte): "100% valid" cannot fail by running out of tokens.
DOC_CARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24, "pattern": "^[A-Za-z0-9_.]+$"},
        "kind": {"enum": ["function", "class", "module", "method"]},
        "summary": {"type": "string", "minLength": 1, "maxLength": 60, "pattern": "^[A-Za-z0-9 ,.()_-]+$"},
    },
    "required": ["name", "kind", "summary"],
    "additionalProperties": False,
}


def speedrun_json(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, n: int = 12, seed: int = 0,
                  max_new_tokens: int = 160, rows: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Schema-constrained requests to the chat model: ``n`` held-out documentation questions asked for a JSON
    "doc card" (:data:`DOC_CARD_SCHEMA`), answered greedily with ``GenerationConfig.json_schema`` and, for
    contrast, without it. Every constrained reply is checked with ``jsonschema``; a reply cut at
    ``max_new_tokens`` counts as invalid. Writes ``OUT/replies.jsonl``; returns counts, times and ``report``.
    ``rows`` replaces the held-out questions (tests)."""
    import json

    from lmstack.infer import GenerationConfig
    from lmstack.infer.structured import is_valid_json
    from lmstack.infer.text import complete_batch
    from lmstack.runs import atomic_write_text

    rows = (rows if rows is not None else heldout_questions(n))[:n]
    prompts = [[{"role": "user", "content": f"{r['instruction']} Reply with a JSON object with the keys name, kind "
                 f"and summary."}] for r in rows]
    out: dict[str, Any] = {"requests": len(rows), "schema": DOC_CARD_SCHEMA}
    replies: dict[str, list[Any]] = {}
    for name, extra in (("constrained", {"json_schema": DOC_CARD_SCHEMA}), ("unconstrained", {})):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, **extra)
        t = time.perf_counter()
        done = complete_batch(model, tokenizer, prompts, cfg)
        seconds = time.perf_counter() - t
        valid = [c.finish_reason == "stop" and is_valid_json(c.text, DOC_CARD_SCHEMA) for c in done]
        replies[name] = done
        out[name] = {"valid": sum(valid), "cut_at_length": sum(c.finish_reason == "length" for c in done),
                     "seconds": round(seconds, 2), "tokens": sum(c.n_tokens for c in done)}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "replies.jsonl", "".join(
        json.dumps({"request": p[0]["content"], "constrained": c.text, "constrained_finish": c.finish_reason,
                    "unconstrained": u.text}) + "\n"
        for p, c, u in zip(prompts, replies["constrained"], replies["unconstrained"])))
    c, u = out["constrained"], out["unconstrained"]
    example = replies["constrained"][0].text if rows else ""
    out["report"] = (
        "### Structured output\n\n"
        f"{len(rows)} held-out documentation questions, each asking the chat model for a JSON object "
        "`{name, kind, summary}` (string lengths bounded, `kind` an enum, no other keys), greedy, "
        f"max {max_new_tokens} new tokens.\n\n"
        "| decoding | valid JSON (parses + validates) | cut at max tokens | seconds | new tokens |\n|---|---:|---:|---:|---:|\n"
        f"| `json_schema` constrained | {c['valid']}/{len(rows)} | {c['cut_at_length']} | {c['seconds']:.1f} | "
        f"{c['tokens']} |\n"
        f"| unconstrained | {u['valid']}/{len(rows)} | {u['cut_at_length']} | {u['seconds']:.1f} | {u['tokens']} |\n\n"
        f"First constrained reply: `{example[:200]}`. All replies: `prompts/json/replies.jsonl`.\n")
    return out
