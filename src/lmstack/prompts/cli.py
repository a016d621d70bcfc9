"""``lmstack prompt add|show|diff|log|label|rollback|export|import|test``: the prompt registry and test suites.

Thin: parse arguments, call :mod:`lmstack.prompts`; the model (torch) loads only inside ``test --model``.
The registry is ``--db`` (default ``$LMSTACK_PROMPT_DB``, else ``prompts.sqlite`` in the current folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", default=None,
                    help="the registry: a SQLite file (default: $LMSTACK_PROMPT_DB, else prompts.sqlite)")
    p = subparsers.add_parser("prompt", help="prompts as code: a versioned registry with labels, and test suites",
                              description="Prompt templates in a registry: every change an immutable version with "
                                          "a diff, labels that move, rollback, YAML export/import for review in "
                                          "git, and test suites that gate CI. See docs/prompts.md.",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="prompt_command", metavar="COMMAND")

    a = sub.add_parser("add", parents=[db], help="add a new version of a prompt", formatter_class=HelpFormatter,
                       description="Add version n+1 of NAME from a YAML file of template fields (instruction, "
                                   "context, input, output_format, examples), from flags, or from an existing "
                                   "version (--from) with some fields replaced.",
                       epilog="examples:\n  lmstack prompt add qa --file qa.yaml -m 'first cut' --label staging\n"
                              "  lmstack prompt add qa --from qa@production --instruction 'Be terse.' -m 'terser'")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--file", default=None, help="a YAML/JSON file with the template fields")
    a.add_argument("--from", dest="base", default=None, metavar="REF", help="start from this version")
    for slot in ("instruction", "context", "input", "output-format"):
        a.add_argument(f"--{slot}", default=None, help=f"the {slot} slot (a Jinja template)")
    a.add_argument("--example", nargs=2, action="append", default=None, metavar=("INPUT", "OUTPUT"),
                   help="a few-shot example (repeatable; replaces the base's examples)")
    a.add_argument("-m", "--message", default="", help="why this change was made")
    a.add_argument("--author", default=None, help="default: $LMSTACK_AUTHOR, else the user name")
    a.add_argument("--label", default=None, help="move this label to the new version")
    a.set_defaults(func=cmd_add)

    s = sub.add_parser("show", parents=[db], help="show a version (NAME, NAME@VERSION, NAME@LABEL)",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  lmstack prompt show qa@production\n"
                              "  lmstack prompt show qa@3 --render question='What is 2+2?'")
    s.add_argument("ref", metavar="REF")
    s.add_argument("--render", nargs="+", default=None, metavar="KEY=VALUE",
                   help="render with these variables (a value that parses as JSON is used as JSON)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    d = sub.add_parser("diff", parents=[db], help="unified diff of two versions (or one against its parent)",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  lmstack prompt diff qa@3\n  lmstack prompt diff qa@production qa@staging")
    d.add_argument("a", metavar="REF")
    d.add_argument("b", metavar="OTHER", nargs="?", default=None)
    d.set_defaults(func=cmd_diff)

    lg = sub.add_parser("log", parents=[db], help="the versions of a prompt, newest first",
                        formatter_class=HelpFormatter,
                        epilog="examples:\n  lmstack prompt log qa\n  lmstack prompt log qa --labels\n"
                               "  lmstack prompt log                # the prompts in the registry")
    lg.add_argument("name", metavar="NAME", nargs="?", default=None, help="default: list the prompts")
    lg.add_argument("--labels", action="store_true", help="show the label history instead")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_log)

    lb = sub.add_parser("label", parents=[db], help="point a label at a version", formatter_class=HelpFormatter,
                        epilog="example:\n  lmstack prompt label qa production 3 -m 'passed the suite'")
    lb.add_argument("name", metavar="NAME")
    lb.add_argument("label", metavar="LABEL")
    lb.add_argument("version", metavar="VERSION", type=int_at_least(1))
    lb.add_argument("-m", "--message", default="")
    lb.add_argument("--author", default=None)
    lb.set_defaults(func=cmd_label)

    rb = sub.add_parser("rollback", parents=[db], help="move a label back to the version it left",
                        formatter_class=HelpFormatter,
                        epilog="examples:\n  lmstack prompt rollback qa production\n"
                               "  lmstack prompt rollback qa production --to 2")
    rb.add_argument("name", metavar="NAME")
    rb.add_argument("label", metavar="LABEL")
    rb.add_argument("--to", type=int_at_least(1), default=None, help="this version instead of the previous one")
    rb.add_argument("-m", "--message", default="")
    rb.add_argument("--author", default=None)
    rb.set_defaults(func=cmd_rollback)

    ex = sub.add_parser("export", parents=[db], help="write one YAML file per prompt (for git)",
                        formatter_class=HelpFormatter, epilog="example:\n  lmstack prompt export prompts/")
    ex.add_argument("folder", metavar="FOLDER")
    ex.add_argument("--name", action="append", default=None, help="only this prompt (repeatable)")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", parents=[db], help="read exported YAML files into the registry",
                        formatter_class=HelpFormatter, epilog="example:\n  lmstack prompt import prompts/")
    im.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders of them")
    im.set_defaults(func=cmd_import)

    t = sub.add_parser("test", parents=[db], help="run a prompt test suite; exit 1 on a failure or regression",
                       formatter_class=HelpFormatter,
                       description="Run SUITE (a YAML file of cases and assertions) against a prompt version, "
                                   "each case --repeats times; with --against (another version) or "
                                   "--against-model (another model), compare and flag regressions. Exit 0: "
                                   "all pass / no regression; 1: a case below its pass rate (single run) or a "
                                   "regression (comparison); 2: bad input.",
                       epilog="examples:\n  lmstack prompt test suite.yaml --prompt qa@staging --against "
                              "qa@production --model runs/speedrun\n"
                              "  lmstack prompt test suite.yaml --prompt qa@3 --generator mypkg.backend:generate")
    t.add_argument("suite", metavar="SUITE")
    t.add_argument("--prompt", default=None, metavar="REF", help="the prompt version (default: the suite's)")
    t.add_argument("--against", default=None, metavar="REF", help="the baseline prompt version")
    t.add_argument("--model", default=None, metavar="RUN", help="a run or model folder that answers, or http(s)://host/v1#model (OpenAI-compatible chat)")
    t.add_argument("--against-model", default=None, metavar="RUN", help="the baseline model (default: --model)")
    t.add_argument("--plain", action="store_true",
                   help="--model: send the prompt as plain text, not through the chat template (a base model)")
    t.add_argument("--generator", default=None, metavar="MODULE:FUNC",
                   help="a Python function generate(messages) -> str instead of --model (any backend)")
    t.add_argument("--judge", default=None, metavar="SPEC",
                   help="the LLM judge for rubric assertions: a run folder or http(s)://host/v1#model")
    t.add_argument("--pairwise-rubric", default=None, metavar="TEXT",
                   help="with a baseline: the judge also compares the two outputs side by side (both orders)")
    t.add_argument("--repeats", type=int_at_least(1), default=None, help="runs per case (default: the suite's)")
    t.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    t.add_argument("--temperature", type=float, default=0.8, help="0: greedy (every repeat identical)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="write the full results as JSON here")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_test)

    r = sub.add_parser("redteam", help="attack a model + system prompt; ASR per category, worst transcripts",
                       formatter_class=HelpFormatter,
                       description="Run the bundled attack suite (prompt injection through retrieved context, "
                                   "jailbreak framings, harmful requests, system-prompt extraction, PII leakage) "
                                   "against MODEL, grade by rules (and --judge), write report.md/json and asr.png.",
                       epilog="examples:\n  lmstack prompt redteam runs/speedrun/chat_model --out runs/redteam\n"
                              "  lmstack prompt redteam runs/speedrun --data-dir ../shared/data --per-category 20 "
                              "--judge http://localhost:8000/v1#judge")
    r.add_argument("model", metavar="MODEL", help="a run or model folder")
    r.add_argument("--out", required=True, help="the report folder")
    r.add_argument("--system", default=None, help="the system prompt under test (default: a support assistant's)")
    r.add_argument("--data-dir", default=None, help="the shared data folder: AdvBench and BIPIA attacks where present")
    r.add_argument("--per-category", type=int_at_least(1), default=10)
    r.add_argument("--categories", default=None, help="comma-separated subset of the categories")
    r.add_argument("--judge", default=None, metavar="SPEC", help="an LLM judge: a run folder or http(s)://host/v1#model")
    r.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_redteam)


def _registry(args: argparse.Namespace, create: bool = False) -> Any:
    from lmstack.prompts.registry import open_registry

    return open_registry(args.db, create=create)   # only add and import may create the file


def _read_fields(path: str) -> dict[str, Any]:
    import yaml

    from lmstack.errors import DataError

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise DataError(f"{p}: not valid YAML or JSON") from None
    if isinstance(data, dict) and set(data) == {"template"}:
        data = data["template"]
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected a mapping of template fields (instruction, context, input, ...)")
    return data


def cmd_add(args: argparse.Namespace) -> int:
    reg = _registry(args, create=not args.base)   # --from reads a registry that must exist
    flags = {"instruction": args.instruction, "context": args.context, "input": args.input,
             "output_format": args.output_format}
    if args.file and args.base:
        raise LmstackError("prompt add: give --file or --from, not both")
    fields: dict[str, Any] = {}
    if args.file:
        fields = _read_fields(args.file)
    elif args.base:
        fields = reg.get(args.base).fields
    fields = {**fields, **{k: v for k, v in flags.items() if v is not None}}
    if args.example is not None:
        fields["examples"] = [{"input": i, "output": o} for i, o in args.example]
    if not fields:
        raise LmstackError("prompt add: give the template with --file, --from or the slot flags (--instruction ...)")
    v = reg.add(args.name, fields, author=args.author, message=args.message, label=args.label)
    print(f"added {v.ref}" + (f" (label {args.label})" if args.label else ""))
    return 0


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_show(args: argparse.Namespace) -> int:
    from lmstack.prompts.registry import fields_yaml

    reg = _registry(args)
    v = reg.get(args.ref)
    labels = sorted(k for k, n in reg.labels(v.name).items() if n == v.version)
    if args.render is not None:
        values = {}
        for item in args.render:
            key, eq, val = item.partition("=")
            if not eq or not key:
                raise LmstackError(f"--render {item!r}: expected KEY=VALUE")
            values[key] = _value(val)
        messages = v.template.render(values).messages
        print(json.dumps(messages, indent=2, ensure_ascii=False) if args.json else
              "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages))
        return 0
    if args.json:
        print(json.dumps({"name": v.name, "version": v.version, "author": v.author, "created": v.created,
                          "message": v.message, "parent": v.parent, "labels": labels, "template": v.fields},
                         indent=2, ensure_ascii=False))
        return 0
    print(f"# {v.ref}  {v.created}  {v.author}" + (f"  [{', '.join(labels)}]" if labels else ""))
    if v.message:
        print("# " + v.message.replace("\n", "\n# "))
    sys.stdout.write(fields_yaml(v.fields))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    sys.stdout.write(_registry(args).diff(args.a, args.b))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.name is None:
        for name in reg.names():
            print(name)
        return 0
    if args.labels:
        moves = reg.label_history(args.name)
        if args.json:
            print(json.dumps([m.__dict__ for m in moves], indent=2, ensure_ascii=False))
        for m in [] if args.json else moves:
            prev = m.previous if m.previous is not None else "-"
            first = m.message.splitlines()[0] if m.message else ""
            print(f"{m.time}  {m.label}: {prev} -> {m.version}  ({m.kind}, {m.author})  {first}".rstrip())
        return 0
    versions = reg.log(args.name)
    labels = reg.labels(args.name)
    if args.json:
        print(json.dumps([{"version": v.version, "parent": v.parent, "author": v.author, "created": v.created,
                           "message": v.message, "labels": sorted(k for k, n in labels.items() if n == v.version)}
                          for v in reversed(versions)], indent=2, ensure_ascii=False))
        return 0
    for v in reversed(versions):
        tags = sorted(k for k, n in labels.items() if n == v.version)
        first = v.message.splitlines()[0] if v.message else ""
        print(f"{v.ref}  {v.created}  {v.author}" + (f"  [{', '.join(tags)}]" if tags else "") +
              (f"  {first}" if first else ""))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    m = _registry(args).set_label(args.name, args.label, args.version, author=args.author, message=args.message)
    print(f"{m.name}@{m.label}: {m.previous if m.previous is not None else '-'} -> {m.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    m = _registry(args).rollback(args.name, args.label, args.to, author=args.author, message=args.message)
    print(f"{m.name}@{m.label}: {m.previous} -> {m.version} (rolled back)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    for path in _registry(args).export(args.folder, args.name):
        print(path)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    for name, (versions, moves) in _registry(args, create=True).import_files(args.paths).items():
        print(f"{name}: {versions} version(s), {moves} label move(s) added")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from lmstack.prompts.suite import cli_test

    return cli_test(args, _registry(args))


def cmd_redteam(args: argparse.Namespace) -> int:
    import json

    from lmstack.eval.llm import load_llm
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import load_run
    from lmstack.prompts.redteam import CATEGORIES, SYSTEM_PROMPT, attack_suite, chat_target, run_redteam, write_report

    Path(args.out).mkdir(parents=True, exist_ok=True)   # an unwritable --out fails before any generation
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else list(CATEGORIES)
    attacks = attack_suite(args.system or SYSTEM_PROMPT, data_dir=args.data_dir, per_category=args.per_category,
                           seed=args.seed, categories=cats)
    judge = load_llm(args.judge) if args.judge else None
    model, tok = load_run(args.model)
    report = run_redteam(chat_target(model, tok, GenerationConfig(max_new_tokens=args.max_new_tokens)), attacks,
                         judge=judge)
    files = write_report(report, args.out)
    if args.json:
        print(json.dumps({"per_category": report.per_category, "judge": report.judge,
                          "files": {k: str(v) for k, v in files.items()}}, indent=2))
    else:
        for cat, e in report.per_category.items():
            r = e["rule"]
            print(f"{cat:26s} ASR {r['asr']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] of {r['n']}")
        print(f"report: {files['markdown']}")
    return 0
