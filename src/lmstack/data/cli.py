"""``lmstack data ...``: prepare pre-training shards from raw text (see lmstack.data.pipeline)."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  lmstack data prepare configs/data_example.toml
  lmstack data prepare my_data.toml --out_dir runs/data --dedup.threshold 0.8 --pack.workers 2
  lmstack data prepare my_data.toml --root /data/raw --tokenizer.path runs/tok

The config lists [[sources]] (name, paths, kind, weight) and optional sections clean.*, dedup, mix,
tokenizer, pack; any field can be overridden as --section.key VALUE. Output: OUT/train, OUT/val
(token shards), OUT/tokenizer, OUT/data_report.md, OUT/report.json."""


def register(subparsers: Any) -> None:
    from lmstack.clihelp import HelpFormatter

    data = subparsers.add_parser("data", help="clean, deduplicate, mix and pack pre-training text",
                                 description="Pre-training data: clean, deduplicate, mix, tokenize and pack text.",
                                 epilog=EPILOG, formatter_class=HelpFormatter)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    prep = sub.add_parser("prepare", help="run a data config: shards + data_report.md",
                          description="Run the data pipeline described by CONFIG (TOML/YAML/JSON).",
                          epilog=EPILOG, formatter_class=HelpFormatter)
    prep.add_argument("config", metavar="CONFIG", help="the pipeline config file")
    prep.add_argument("--quiet", action="store_true", help="no progress lines")
    prep.set_defaults(func=_prepare, accepts_overrides=True)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


def _prepare(args: argparse.Namespace) -> int:
    from lmstack.config import load_config
    from lmstack.data.pipeline import PrepareConfig, prepare

    config = load_config(PrepareConfig, args.config, getattr(args, "overrides", None))
    report = prepare(config, progress=not args.quiet)
    tr = report["shards"]["train"]
    print(f"wrote {tr['tokens']:,} training tokens in {tr['shards']} shard(s) and "
          f"{report['shards']['val']['tokens']:,} validation tokens to {config.out_dir} "
          f"(report: {config.out_dir}/data_report.md)")
    return 0
