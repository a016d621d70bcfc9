"""``lmstack monitor export|feedback-export|prune|stats``: the interaction log from the command line.

:func:`register_log_commands` adds them to the ``monitor`` command's subparsers (``monitor/cli.py`` calls it).
Thin: parse, call :mod:`lmstack.monitor.store` / :mod:`lmstack.monitor.feedback`, print. The store is
``--store URL`` (default ``$LMSTACK_LOG_STORE``): a SQLite file path or ``sqlite:///...``, or
``postgresql://...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import UTC, datetime
from typing import Any

from lmstack.errors import LmstackError

STORE_ENV = "LMSTACK_LOG_STORE"


def parse_when(text: str) -> float:
    """An argparse ``type``: unix seconds, or an ISO 8601 date / date-time (UTC unless it names a zone)."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected unix seconds or an ISO 8601 date such as 2026-05-28 or "
                                             f"2026-05-28T12:00:00, got {text!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of unix seconds, got {text!r}")
    return value


def days(text: str) -> float:
    """An argparse ``type``: a number of days >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {text}")
    return value


def register_log_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export``, ``feedback-export``, ``prune`` and ``stats`` to the ``monitor`` command's subparsers."""
    from lmstack.clihelp import HelpFormatter

    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=None, metavar="URL",
                       help=f"the log store: a SQLite file, sqlite:///path.db or postgresql://user@host/db "
                            f"(default: ${STORE_ENV})")
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--since", type=parse_when, default=None, metavar="WHEN",
                        help="from this time on (unix seconds or ISO 8601, UTC)")
    window.add_argument("--model", default=None, help="only this model's interactions")

    e = subparsers.add_parser("export", parents=[store, window], formatter_class=HelpFormatter,
                              help="write logged interactions as JSONL (the rows `monitor drift` reads)",
                              description="Write the interactions (time order; every field as JSON, time in "
                                          "unix seconds) to a JSONL file, atomically.",
                              epilog="examples:\n  lmstack monitor export --store log.db --out week.jsonl "
                                     "--since 2026-05-21\n  lmstack monitor export --store postgresql://lm@db/"
                                     "logs --out b.jsonl --model candidate")
    e.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    e.add_argument("--until", type=parse_when, default=None, metavar="WHEN", help="before this time")
    e.add_argument("--arm", default=None, help="only this A/B arm's interactions")
    e.add_argument("--with-feedback", action="store_true",
                   help='add each row\'s feedback as "feedback": [{kind, value, ...}] (the drift feedback signals)')
    e.set_defaults(func=cmd_export)

    f = subparsers.add_parser("feedback-export", parents=[store, window], formatter_class=HelpFormatter,
                              help="write feedback as DPO pairs and KTO rows for lmstack align dpo|kto",
                              description="Turn pairwise choices and thumbs into preference pairs "
                                          "({prompt, chosen, rejected}) and thumbs into KTO rows ({prompt, "
                                          "completion, label}), the files lmstack align dpo|kto read as "
                                          "data.train. --since and --model filter the feedback / interactions.",
                              epilog="examples:\n  lmstack monitor feedback-export --store log.db --dpo pairs.jsonl "
                                     "--kto kto.jsonl")
    f.add_argument("--dpo", default=None, metavar="FILE", help="write the preference pairs here")
    f.add_argument("--kto", default=None, metavar="FILE", help="write the KTO rows here")
    f.set_defaults(func=cmd_feedback_export)

    p = subparsers.add_parser("prune", parents=[store], formatter_class=HelpFormatter,
                              help="delete interactions (and their feedback) older than N days",
                              epilog="examples:\n  lmstack monitor prune --store log.db --older-than 90")
    p.add_argument("--older-than", type=days, required=True, metavar="DAYS", help="age in days (e.g. 30 or 0.5)")
    p.set_defaults(func=cmd_prune)

    s = subparsers.add_parser("stats", parents=[store], formatter_class=HelpFormatter,
                              help="interactions, feedback and latency per model and UTC day",
                              epilog="examples:\n  lmstack monitor stats --store log.db --json")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_stats)


def _open(args: argparse.Namespace) -> Any:
    from lmstack.monitor.store import open_store

    url = args.store or os.environ.get(STORE_ENV)
    if not url:
        raise LmstackError(f"--store: give the log store's URL or path (or set ${STORE_ENV})")
    return open_store(url, create=False)


def cmd_export(args: argparse.Namespace) -> int:
    from lmstack.monitor.store import export_jsonl

    if args.since is not None and args.until is not None and args.until <= args.since:
        raise LmstackError(f"--until ({args.until}) must come after --since ({args.since})")
    with _open(args) as store:
        n = export_jsonl(store, args.out, since=args.since, until=args.until, model=args.model, arm=args.arm,
                         with_feedback=args.with_feedback)
    print(f"wrote {n} interactions to {args.out}")
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from lmstack.monitor.feedback import write_alignment_data

    if args.dpo is None and args.kto is None:
        raise LmstackError("feedback-export: give --dpo FILE, --kto FILE or both")
    with _open(args) as store:
        counts = write_alignment_data(store, dpo=args.dpo, kto=args.kto, since=args.since, model=args.model)
    if "dpo" in counts:
        print(f"wrote {counts['dpo']} preference pairs to {args.dpo}")
    if "kto" in counts:
        print(f"wrote {counts['kto']} KTO rows to {args.kto}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with _open(args) as store:
        n = store.prune(args.older_than * 86400.0)
    print(f"deleted {n} interactions older than {args.older_than:g} days")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = store.stats()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no interactions logged")
        return 0
    head = ("model", "day", "interactions", "feedback", "up", "down", "mean latency s")
    table = [head] + [(r["model"], r["day"], str(r["interactions"]), str(r["feedback"]), str(r["thumbs_up"]),
                       str(r["thumbs_down"]), f"{r['mean_latency_s']:.3f}") for r in rows]
    widths = [max(len(t[k]) for t in table) for k in range(len(head))]
    for t in table:
        sys.stdout.write("  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(t, widths)))
                         .rstrip() + "\n")
    return 0
