"""``lmstack eval metrics | bench | correlate | train-metric | setup-wordnet``: thin wrappers over lmstack.eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least, positive_float

    group = subparsers.add_parser(
        "eval", help="metrics, benchmarks, judges' meta-evaluation", formatter_class=HelpFormatter,
        description="Evaluate predictions with metrics (BLEU, chrF, ROUGE, METEOR, BERTScore, ...), run "
                    "benchmarks on a model, and correlate metrics with human ratings.",
        epilog="examples:\n"
               "  lmstack eval metrics --pred hyp.txt --ref ref.txt --metrics bleu,chrf,rougeL --ci\n"
               "  lmstack eval bench runs/speedrun --tasks hellaswag,humaneval --data-dir ../shared/data --limit 100\n"
               "  lmstack eval correlate summeval.jsonl --pred-field summary --ref-field article \\\n"
               "      --compute rouge1,rouge2 --human coherence,relevance --group-field article_id\n"
               "  lmstack eval setup-wordnet")
    sub = group.add_subparsers(dest="eval_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    m = sub.add_parser(
        "metrics", help="score predictions against references", formatter_class=HelpFormatter,
        description="Score --pred against --ref (repeat --ref for several references per item) with each "
                    "metric; print a table and optionally write JSON (corpus score, per-item scores, details). "
                    "Files: .txt (a line per item), .jsonl/.json (--pred-field/--ref-field), .csv (column). "
                    "--compare B.txt tests whether system B differs from A (paired, same references).",
        epilog="examples:\n"
               "  lmstack eval metrics --pred hyp.txt --ref ref.txt --metrics bleu,chrf\n"
               "  lmstack eval metrics --pred out.jsonl --pred-field output --ref data.jsonl --ref-field answer \\\n"
               "      --metrics rougeL,meteor --option rougeL.use_stemmer=true --json scores.json\n"
               "  lmstack eval metrics --pred sysA.txt --compare sysB.txt --ref ref.txt --metrics bleu --ci\n"
               "  lmstack eval metrics --list")
    m.add_argument("--pred", help="predictions file")
    m.add_argument("--ref", action="append", default=[], help="references file (repeatable)")
    m.add_argument("--source", help="sources file (for source-conditioned metrics)")
    m.add_argument("--pred-field", default="prediction")
    m.add_argument("--ref-field", default="reference")
    m.add_argument("--source-field", default="source")
    m.add_argument("--metrics", default="bleu,chrf,rougeL", help="comma-separated metric names")
    m.add_argument("--option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="metric option, value parsed as YAML (repeatable)")
    m.add_argument("--ci", action="store_true", help="95%% bootstrap confidence intervals")
    m.add_argument("--compare", help="a second system's predictions: paired significance vs --pred")
    m.add_argument("--resamples", type=int_at_least(1), default=1000)
    m.add_argument("--json", dest="json_out", help="write full results to this JSON file")
    m.add_argument("--list", action="store_true", help="list the metrics and their options")
    m.set_defaults(func=cmd_metrics)

    b = sub.add_parser(
        "bench", help="run benchmark tasks on a model", formatter_class=HelpFormatter,
        description="Run tasks (YAML files, or names of the built-in tasks: hellaswag, gsm8k, humaneval, "
                    "tinystories_ppl) on MODEL: a run directory or model folder (lmstack or Hugging Face) with "
                    "tokenizer.json, or an OpenAI-compatible endpoint URL#model for generative tasks. Data paths "
                    "in tasks are relative to --data-dir.",
        epilog="examples:\n"
               "  lmstack eval bench runs/speedrun --tasks hellaswag --data-dir ../shared/data --limit 200\n"
               "  lmstack eval bench runs/sft --tasks gsm8k,humaneval --data-dir ../shared/data --json bench.json\n"
               "  lmstack eval bench http://localhost:8000/v1#my-model --tasks gsm8k --data-dir ../shared/data")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--tasks", required=True, help="comma-separated task names or YAML paths")
    b.add_argument("--data-dir", default=None, help="root for task data paths (default $LMSTACK_DATA or ../shared/data)")
    b.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate the first N items of each task")
    b.add_argument("--num-fewshot", type=int_at_least(0), default=None)
    b.add_argument("--device", default="auto")
    b.add_argument("--add-bos", default=None, choices=["auto", "true", "false"],
                   help="BOS before each context (default auto: the tokenizer's own rule, as lm-eval >= 0.4.9.2)")
    b.add_argument("--json", dest="json_out")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser(
        "correlate", help="correlate metrics with human ratings (summary / system level)",
        formatter_class=HelpFormatter,
        description="Pearson, Spearman and Kendall between metric scores and human ratings in a JSONL/CSV file, "
                    "at summary level (per --group-field, averaged), system level (per --system-field) or flat. "
                    "Metric scores come from columns (--scores) or are computed (--compute) from --pred-field "
                    "against --ref-field.",
        epilog="examples:\n"
               "  lmstack eval correlate summeval.jsonl --pred-field summary --ref-field article \\\n"
               "      --compute rouge1,rougeL --human coherence,consistency,fluency,relevance --group-field article_id\n"
               "  lmstack eval correlate judged.jsonl --scores geval,bleu --human rating --level flat")
    c.add_argument("file")
    c.add_argument("--human", required=True, help="comma-separated human rating fields")
    c.add_argument("--scores", default="", help="comma-separated fields that already hold metric scores")
    c.add_argument("--compute", default="", help="comma-separated metrics to compute")
    c.add_argument("--pred-field", default="prediction")
    c.add_argument("--ref-field", default="reference")
    c.add_argument("--group-field", default=None)
    c.add_argument("--system-field", default=None)
    c.add_argument("--level", default="summary", choices=["summary", "system", "flat"])
    c.add_argument("--json", dest="json_out")
    c.set_defaults(func=cmd_correlate)

    t = sub.add_parser(
        "train-metric", help="train a learned (BLEURT-style) metric on human ratings", formatter_class=HelpFormatter,
        description="Fine-tune an encoder with a regression head on (reference, candidate, rating) rows of a "
                    "JSONL/CSV file; the result loads with compute_metric('bleurt', ..., checkpoint=OUT).",
        epilog="examples:\n"
               "  lmstack eval train-metric ratings.jsonl runs/my_metric --pred-field summary --ref-field article \\\n"
               "      --rating-field relevance --epochs 2")
    t.add_argument("file")
    t.add_argument("out")
    t.add_argument("--pred-field", default="prediction")
    t.add_argument("--ref-field", default="reference")
    t.add_argument("--rating-field", default="rating")
    t.add_argument("--base", default=None, help="encoder folder (default all-MiniLM-L6-v2)")
    t.add_argument("--epochs", type=int_at_least(1), default=1)
    t.add_argument("--lr", type=positive_float, default=3e-5)
    t.add_argument("--batch-size", type=int_at_least(1), default=16)
    t.add_argument("--max-length", type=int_at_least(1), default=256)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_metric)

    w = sub.add_parser(
        "setup-wordnet", help="build the offline WordNet folder METEOR uses", formatter_class=HelpFormatter,
        description="Copy the WordNet 3.0 database files (default /usr/share/wordnet, from the Debian packages "
                    "wordnet-base and wordnet-sense-index) into the lmstack cache as an nltk corpus, with the "
                    "lexnames file nltk needs. METEOR also does this on first use.",
        epilog="examples:\n  apt-get install -y wordnet-base wordnet-sense-index && lmstack eval setup-wordnet")
    w.add_argument("--source", default=None, help="folder with the WordNet database files")
    w.set_defaults(func=cmd_setup_wordnet)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _options(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        metric, dot, opt = key.partition(".")
        if not eq or not dot:
            raise ConfigError(f"--option {item!r}: expected METRIC.KEY=VALUE, e.g. bleu.tokenize=intl")
        out.setdefault(metric, {})[opt] = yaml.safe_load(value)
    return out


def cmd_metrics(args: argparse.Namespace) -> int:
    from lmstack.eval.metrics import list_metrics, metric_options
    from lmstack.eval.report import metrics_table, read_column, run_metrics
    from lmstack.eval.stats import paired_bootstrap, paired_permutation

    if args.list and (args.pred or args.ref):
        raise ConfigError("--list prints the metrics and scores nothing: drop --pred/--ref, or drop --list")
    if args.list:
        for name, spec in sorted(list_metrics().items()):
            opts = ", ".join(f"{k}={v!r}" for k, v in metric_options(spec).items())
            print(f"{name:14s} {spec.doc}\n{'':14s} scale {spec.scale}; options: {opts}")
        return 0
    if not args.pred:
        raise ConfigError("--pred is required (or --list)")
    preds = read_column(args.pred, args.pred_field)
    refs = None
    if args.ref:
        columns = [read_column(r, args.ref_field) for r in args.ref]
        for r, col in zip(args.ref, columns):
            if len(col) != len(preds):
                raise ConfigError(f"{r}: {len(col)} references but {len(preds)} predictions in {args.pred}")
        refs = [list(group) for group in zip(*columns)]
    sources = read_column(args.source, args.source_field) if args.source else None
    names, opts = _split(args.metrics), _options(args.option)
    results = run_metrics(names, preds, refs, sources, opts, ci=args.ci, n_resamples=args.resamples)
    compare = None
    if args.compare:
        other = run_metrics(names, read_column(args.compare, args.pred_field), refs, sources, opts)
        compare = {}
        for n in names:
            perm = paired_permutation(results[n], other[n], n_resamples=args.resamples)
            boot = paired_bootstrap(results[n], other[n], n_resamples=args.resamples)
            compare[n] = {"delta": perm["delta"], "p_permutation": perm["p_value"], "p_bootstrap": boot["p_value"],
                          "score_b": other[n].score}
    print(metrics_table(results, compare))
    for r in results.values():
        if r.failures:
            print(f"{r.name}: {len(r.failures)} item(s) failed, first: {r.failures[0]}", file=sys.stderr)
    if args.json_out:
        from lmstack.runs import atomic_write_json

        atomic_write_json(args.json_out, {"metrics": {n: r.to_dict() for n, r in results.items()}, "compare": compare})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lmstack.eval.harness import load_task, results_table, run_task

    tasks = [load_task(name) for name in _split(args.tasks)]  # every task file is checked before any runs
    if not tasks:
        raise ConfigError("--tasks: give at least one task name or YAML path")
    model = tokenizer = llm = None
    if args.model.startswith(("http://", "https://")):
        from lmstack.eval.llm import load_llm

        llm = load_llm(args.model)
    else:
        from lmstack.infer.text import load_run

        model, tokenizer = load_run(args.model, device=args.device)
    results, failures = [], []
    for task in tasks:
        if args.limit:
            task.limit = args.limit
        if args.num_fewshot is not None:
            task.num_fewshot = args.num_fewshot
        if args.add_bos in ("true", "false"):
            task.add_bos = args.add_bos == "true"
        try:
            res = run_task(task, model=model, tokenizer=tokenizer, llm=llm, data_dir=args.data_dir)
        except LmstackError as e:  # keep what finished; one bad task file must not cost the others
            failures.append({"name": task.name, "error": str(e)})
            print(f"{task.name}: failed: {e}", file=sys.stderr)
            continue
        print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items()) + f" ({res.seconds:.1f}s)",
              file=sys.stderr)
        results.append(res)
    if results:
        print(results_table(results))
    if args.json_out and (results or not failures):
        from lmstack.runs import atomic_write_json

        atomic_write_json(args.json_out, {"model": args.model, "tasks": [r.to_dict() for r in results],
                                          "failed": failures})
    if failures:
        kept = f"; the {len(results)} finished are in {args.json_out}" if args.json_out and results else ""
        raise LmstackError(f"{len(failures)} of {len(tasks)} tasks failed ({', '.join(f['name'] for f in failures)})"
                           f"{kept}")
    return 0


def _rows(path: str) -> list[dict[str, Any]]:
    import csv

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    from lmstack.eval.harness import read_rows

    return read_rows(p)


def _field(rows: list[dict[str, Any]], name: str, path: str) -> list[Any]:
    missing = [i for i, r in enumerate(rows) if name not in r]
    if missing:
        raise ConfigError(f"{path}: row {missing[0]} has no field {name!r} (fields: {', '.join(rows[missing[0]])})")
    return [r[name] for r in rows]


def _numbers(rows: list[dict[str, Any]], name: str, path: str) -> list[float]:
    out = []
    for i, x in enumerate(_field(rows, name, path)):
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: row {i} field {name!r}: expected a number, got {x!r}") from None
    return out


def cmd_correlate(args: argparse.Namespace) -> int:
    from lmstack.eval.correlate import correlate_table, table_markdown
    from lmstack.eval.metrics import compute_metric

    rows = _rows(args.file)
    human = {h: _numbers(rows, h, args.file) for h in _split(args.human)}
    scores = {s: _numbers(rows, s, args.file) for s in _split(args.scores)}
    if args.compute:
        preds = [str(x) for x in _field(rows, args.pred_field, args.file)]
        refs = [str(x) for x in _field(rows, args.ref_field, args.file)]
        for name in _split(args.compute):
            scores[name] = compute_metric(name, preds, refs).per_item
    if not scores:
        raise ConfigError("give --scores (fields with metric scores) and/or --compute (metrics to compute)")
    groups = _field(rows, args.group_field, args.file) if args.group_field else None
    systems = _field(rows, args.system_field, args.file) if args.system_field else None
    table = correlate_table(scores, human, groups, systems, args.level)
    print(f"{args.level} level, {len(rows)} rows; cells: Spearman / Kendall (Pearson in --json)")
    print(table_markdown(table))
    if args.json_out:
        from lmstack.runs import atomic_write_json

        atomic_write_json(args.json_out, {"level": args.level, "table": table})
    return 0


def cmd_train_metric(args: argparse.Namespace) -> int:
    from lmstack.eval.metrics.bleurt import TrainMetricConfig, train_metric

    rows = _rows(args.file)
    cfg = TrainMetricConfig(base=args.base, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, seed=args.seed)
    summary = train_metric([str(x) for x in _field(rows, args.ref_field, args.file)],
                           [str(x) for x in _field(rows, args.pred_field, args.file)],
                           [float(x) for x in _field(rows, args.rating_field, args.file)], args.out, cfg)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_setup_wordnet(args: argparse.Namespace) -> int:
    from lmstack.eval.metrics.wordnet import build_wordnet

    data_dir = build_wordnet(args.source)
    print(f"WordNet ready for nltk at {data_dir / 'corpora' / 'wordnet'}")
    return 0
