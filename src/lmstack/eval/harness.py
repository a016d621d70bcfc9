"""The benchmark harness: tasks defined in small YAML files, run against a model or an ``LLM``.

Four kinds of task:

- ``multiple_choice``: each choice is scored by ``log p(delimiter + choice | few-shot + query)``;
  ``acc`` takes the argmax, ``acc_norm`` the argmax of log-likelihood / len(choice in characters), as
  lm-evaluation-harness defines them (HellaSwag, ARC, any JSONL with a question, choices and a label);
- ``generate``: greedy generation, answer extraction (a strict regex such as GSM8K's ``#### N``, then the
  last number as a flexible fallback) and exact match;
- ``code``: n samples per problem, each run in :mod:`lmstack.eval.sandbox` with its tests; unbiased pass@k;
- ``perplexity``: perplexity and bits-per-byte of a text set.

Few-shot examples come from the same file (never the item itself), drawn with a fixed seed per item.
Data paths in task files are relative to ``data_dir`` (``--data-dir``), so the same task runs anywhere.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError

KINDS = ("multiple_choice", "generate", "code", "perplexity")
FORMATS = ("generic", "hellaswag", "arc", "gsm8k", "humaneval", "text")


@dataclass
class TaskConfig:
    name: str
    kind: str
    path: str
    format: str = "generic"
    limit: int | None = None
    num_fewshot: int = 0
    seed: int = 1234
    prompt: str = "{question}"            # generic: query template over the row's fields
    choices_field: str = "choices"
    label_field: str = "label"
    answer_field: str = "answer"
    text_field: str = "text"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["\n\n", "Question:"])
    answer_regex: str = r"#### (\-?[0-9\.\,]+)"
    n_samples: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    timeout_s: float = 5.0
    memory_mb: int = 512
    batch_size: int = 8
    workers: int = 2
    add_bos: bool | None = None           # BOS before each context/text: None = the tokenizer's rule (lm-eval)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r} field 'kind': expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"task {self.name!r} field 'format': expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.kind == "code" and any(k > self.n_samples for k in self.k):
            raise ConfigError(f"task {self.name!r}: pass@k needs n_samples >= max(k) = {max(self.k)}")
        if self.num_fewshot < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"task {self.name!r}: num_fewshot must be >= 0 and limit >= 1")


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    n: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "metrics": self.metrics, "n": self.n, "seconds": self.seconds,
                "records": self.records}


def builtin_tasks() -> dict[str, Any]:
    """The built-in task files shipped as package data (``lmstack/eval/tasks/*.yaml``), by name."""
    from importlib.resources import files

    folder = files("lmstack.eval") / "tasks"
    return {f.name.rsplit(".", 1)[0]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def load_task(name_or_path: str | os.PathLike, tasks_dir: str | os.PathLike | None = None) -> TaskConfig:
    """A task from a YAML/JSON/TOML file, or by name from ``tasks_dir`` (default: the built-in tasks)."""
    from lmstack.config import from_dict, parse_config_text, read_config_file

    p = Path(name_or_path)
    if p.is_file():
        data, stem = read_config_file(p), p.stem
    elif tasks_dir is not None:
        folder = Path(tasks_dir)
        p = folder / f"{name_or_path}.yaml"
        if not p.is_file():
            known = sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []
            raise ConfigError(f"no task {str(name_or_path)!r} (not a file; known in {folder}: {', '.join(known) or 'none'})")
        data, stem = read_config_file(p), p.stem
    else:
        builtin = builtin_tasks()
        if str(name_or_path) not in builtin:
            raise ConfigError(f"no task {str(name_or_path)!r} (not a file, not a built-in task: "
                              f"{', '.join(sorted(builtin))})")
        stem = str(name_or_path)
        data = parse_config_text(builtin[stem].read_bytes(), ".yaml", f"built-in task {stem}")
    data.setdefault("name", stem)
    return from_dict(TaskConfig, data)


# ----------------------------------------------------------------------------------------------- data


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .jsonl.gz / .json / .parquet file (:func:`lmstack.sources.iter_file_rows`), or the
    paragraphs of a .txt/.md file as ``{"text"}``; an empty file is an error."""
    from lmstack.sources import iter_file_rows, read_text_file, row_suffix

    if not path.is_file():
        raise DataError(f"{path}: no such data file (task paths are relative to --data-dir)")
    if row_suffix(path) is not None:
        rows = [row for _, row in iter_file_rows(path)]
    elif path.suffix.lower() in (".txt", ".md"):
        rows = [{"text": p.strip()} for p in re.split(r"\n\s*\n", read_text_file(path)) if p.strip()]
    else:
        raise DataError(f"{path}: unsupported data file (use .jsonl, .json, .parquet, .txt, .md; .jsonl may be .gz)")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def to_doc(row: dict[str, Any], task: TaskConfig, i: int) -> dict[str, Any]:
    """A raw row -> ``{"query", "choices", "gold"}`` (multiple choice), ``{"query", "target", "fewshot_target"}``
    (generate), ``{"prompt", "test", "entry_point", "id"}`` (code) or ``{"text"}`` (perplexity)."""
    try:
        fmt = task.format
        if fmt == "hellaswag":
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
                    "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}
        if fmt == "arc":
            q = row["question"]
            stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, row["choices"])
            if isinstance(choices, dict):
                texts, labels = list(choices["text"]), list(choices["label"])
            else:
                texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
            return {"query": f"Question: {stem}\nAnswer:", "choices": texts, "gold": labels.index(row["answerKey"])}
        if fmt == "gsm8k":
            return {"query": f"Question: {row['question']}\nAnswer:", "target": row["answer"].split("####")[-1].strip(),
                    "fewshot_target": row["answer"]}
        if fmt == "humaneval":
            return {"id": row["task_id"], "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
                    "canonical_solution": row.get("canonical_solution")}
        if fmt == "text":
            return {"text": row[task.text_field]}
        if task.kind == "multiple_choice":
            choices = list(row[task.choices_field])
            label = row[task.label_field]
            gold = choices.index(label) if isinstance(label, str) and label in choices else int(label)
            return {"query": task.prompt.format(**row), "choices": choices, "gold": gold}
        if task.kind == "perplexity":
            return {"text": row[task.text_field]}
        target = str(row[task.answer_field])
        return {"query": task.prompt.format(**row), "target": target, "fewshot_target": target}
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise DataError(f"task {task.name!r} row {i}: does not fit format {task.format!r} ({type(e).__name__}: {e})") from None


def load_docs(task: TaskConfig, data_dir: str | os.PathLike | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(docs to evaluate, the full pool few-shot examples are drawn from)."""
    path = Path(task.path)
    if not path.is_absolute():
        path = Path(data_dir or os.environ.get("LMSTACK_DATA", "../shared/data")) / path
    rows = read_rows(path)
    docs = [to_doc(r, task, i) for i, r in enumerate(rows)]
    if not docs:
        raise DataError(f"{path}: no rows")
    return docs[:task.limit] if task.limit else docs, docs


def fewshot_prefix(task: TaskConfig, pool: Sequence[dict[str, Any]], index: int) -> str:
    if not task.num_fewshot:
        return ""
    rng = random.Random(task.seed + index)
    candidates = [j for j in range(len(pool)) if j != index]
    shots = [pool[j] for j in rng.sample(candidates, min(task.num_fewshot, len(candidates)))]
    parts = []
    for d in shots:
        target = d["choices"][d["gold"]] if "choices" in d else d.get("fewshot_target", d.get("target", ""))
        parts.append(d["query"] + task.target_delimiter + target)
    return task.fewshot_delimiter.join(parts) + task.fewshot_delimiter


# ---------------------------------------------------------------------------------------------- runners


def _stderr(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def run_multiple_choice(task: TaskConfig, docs: list[dict[str, Any]], pool: list[dict[str, Any]], model: Any,
                        tokenizer: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from lmstack.eval.lm import loglikelihoods

    contexts, conts, owner = [], [], []
    for i, d in enumerate(docs):
        ctx = fewshot_prefix(task, pool, i) + d["query"]
        for c in d["choices"]:
            contexts.append(ctx)
            conts.append(task.target_delimiter + c)
            owner.append(i)
    scored = loglikelihoods(model, tokenizer, contexts, conts, task.batch_size, add_bos=task.add_bos)
    lls: list[list[float]] = [[] for _ in docs]
    for i, s in zip(owner, scored):
        lls[i].append(s.logprob)
    records, acc, acc_norm = [], [], []
    for d, ll in zip(docs, lls):
        ll_arr = np.asarray(ll)
        lengths = np.asarray([float(len(c)) for c in d["choices"]])
        pred, pred_norm = int(ll_arr.argmax()), int((ll_arr / lengths).argmax())
        acc.append(float(pred == d["gold"]))
        acc_norm.append(float(pred_norm == d["gold"]))
        records.append({"gold": d["gold"], "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll})
    return {"acc": float(np.mean(acc)), "acc_stderr": _stderr(acc), "acc_norm": float(np.mean(acc_norm)),
            "acc_norm_stderr": _stderr(acc_norm)}, records


_LAST_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str:
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return t
    return str(int(value)) if value == int(value) else str(value)


def extract_answer(text: str, strict_regex: str) -> tuple[str | None, str | None]:
    """(strict answer via the task regex, flexible answer = the last number in the text)."""
    m = re.search(strict_regex, text)
    strict = normalize_number(m.group(1)) if m else None
    numbers = _LAST_NUMBER.findall(text)
    flexible = normalize_number(numbers[-1]) if numbers else None
    return strict, flexible


def run_generate(task: TaskConfig, docs: list[dict[str, Any]], pool: list[dict[str, Any]],
                 llm: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    prompts = [fewshot_prefix(task, pool, i) + d["query"] for i, d in enumerate(docs)]
    replies = llm.complete(prompts, max_tokens=task.max_new_tokens, temperature=0.0, stop=task.stop)
    records, strict_hits, flex_hits = [], [], []
    for d, r in zip(docs, replies):
        text = r[0].text
        strict, flexible = extract_answer(text, task.answer_regex)
        target = normalize_number(d["target"])
        strict_hits.append(float(strict == target))
        flex_hits.append(float(flexible == target))
        records.append({"target": target, "output": text, "strict": strict, "flexible": flexible})
    return {"exact_match": float(np.mean(strict_hits)), "exact_match_stderr": _stderr(strict_hits),
            "exact_match_flexible": float(np.mean(flex_hits))}, records


HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def code_program(doc: dict[str, Any], completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def run_code_task(task: TaskConfig, docs: list[dict[str, Any]], llm: Any = None,
                  samples: dict[str, list[str]] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """pass@k over the docs; completions come from ``llm`` (n_samples each) or from ``samples`` (id -> list)."""
    from lmstack.eval.sandbox import pass_at_k, run_many

    if samples is None:
        if llm is None:
            raise ConfigError(f"task {task.name!r}: a code task needs a model/LLM or precomputed samples")
        temp = task.temperature if task.n_samples == 1 else (task.temperature or 0.8)
        replies = llm.complete([d["prompt"] for d in docs], max_tokens=task.max_new_tokens, temperature=temp,
                               n=task.n_samples, stop=task.stop or HUMANEVAL_STOP, seed=task.seed)
        samples = {d["id"]: [c.text for c in r] for d, r in zip(docs, replies)}
    programs, owner = [], []
    for i, d in enumerate(docs):
        if d["id"] not in samples:
            raise DataError(f"no samples for problem {d['id']!r}")
        for completion in samples[d["id"]]:
            programs.append(code_program(d, completion))
            owner.append(i)
    results = run_many(programs, workers=task.workers, timeout_s=task.timeout_s, memory_mb=task.memory_mb)
    per_doc: list[list[str]] = [[] for _ in docs]
    for i, r in zip(owner, results):
        per_doc[i].append(r.status)
    metrics, records = {}, []
    for k in task.k:
        values = [pass_at_k(len(s), s.count("passed"), k) for s in per_doc]
        metrics[f"pass@{k}"] = float(np.mean(values))
    for d, s in zip(docs, per_doc):
        records.append({"id": d["id"], "n": len(s), "passed": s.count("passed"), "statuses": s})
    return metrics, records


def run_perplexity(task: TaskConfig, docs: list[dict[str, Any]], model: Any, tokenizer: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from lmstack.eval.metrics import compute_metric

    res = compute_metric("perplexity", [d["text"] for d in docs], model=model, tokenizer=tokenizer,
                         batch_size=task.batch_size, add_bos=task.add_bos)
    return ({"perplexity": res.score, "bits_per_byte": res.details["bits_per_byte"], "tokens": res.details["tokens"]},
            [{"perplexity": p} for p in res.per_item])


def run_task(task: TaskConfig, *, model: Any = None, tokenizer: Any = None, llm: Any = None,
             data_dir: str | os.PathLike | None = None, samples: dict[str, list[str]] | None = None) -> TaskResult:
    """Run one task. Multiple choice and perplexity need ``model`` + ``tokenizer`` (log-likelihoods);
    generate and code need an ``llm`` (built from the model when not given)."""
    start = time.perf_counter()
    docs, pool = load_docs(task, data_dir)
    if task.kind in ("multiple_choice", "perplexity") and (model is None or tokenizer is None):
        raise ConfigError(f"task {task.name!r} ({task.kind}) scores log-likelihoods: it needs a local model and tokenizer")
    if task.kind in ("generate", "code") and llm is None and model is not None and samples is None:
        from lmstack.eval.llm import LocalLLM

        llm = LocalLLM(model, tokenizer, batch_size=task.batch_size)
    if task.kind == "multiple_choice":
        metrics, records = run_multiple_choice(task, docs, pool, model, tokenizer)
    elif task.kind == "generate":
        if llm is None:
            raise ConfigError(f"task {task.name!r}: generation needs a model or an LLM")
        metrics, records = run_generate(task, docs, pool, llm)
    elif task.kind == "code":
        metrics, records = run_code_task(task, docs, llm, samples)
    else:
        metrics, records = run_perplexity(task, docs, model, tokenizer)
    return TaskResult(task.name, task.kind, metrics, len(docs), time.perf_counter() - start, records)


def results_table(results: Sequence[TaskResult]) -> str:
    lines = ["| task | kind | n | metric | value |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for k, v in r.metrics.items():
            if k.endswith("_stderr"):
                continue
            err = r.metrics.get(f"{k}_stderr")
            value = f"{v:.4f}" + (f" ± {err:.4f}" if err is not None and math.isfinite(err) else "")
            lines.append(f"| {r.name} | {r.kind} | {r.n} | {k} | {value} |")
    return "\n".join(lines)
