"""``lmstack align METHOD CONFIG``: reward models, DPO and KTO runs (thin wrappers over :mod:`lmstack.align`).

Each method is one entry of :data:`METHODS`: ``name -> (help, "module:run function", "module:config loader",
"module:report renderer")``. The runner is imported when the subcommand runs, never at ``lmstack --help``.
Adding a method (``ppo``, ``grpo``) is one more entry with the same three callables.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from typing import Any

METHODS: dict[str, tuple[str, str, str, str]] = {
    "rm": ("reward model: a scalar head on the base, Bradley-Terry loss on preference pairs",
           "lmstack.align.reward:train_reward_model", "lmstack.align.reward:main_config",
           "lmstack.align.reward:render_report"),
    "dpo": ("DPO / IPO / label-smoothed DPO on preference pairs against a frozen reference",
            "lmstack.align.dpo:dpo", "lmstack.align.dpo:main_config", "lmstack.align.dpo:render_report"),
    "kto": ("KTO on desirable/undesirable replies (unpaired), KL reference point from mismatched pairs",
            "lmstack.align.kto:kto", "lmstack.align.kto:main_config", "lmstack.align.kto:render_report"),
}


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    p = subparsers.add_parser(
        "align", help="alignment: reward models, DPO/IPO, KTO on preference data",
        description="Align a fine-tuned model on preference data (JSONL/JSON/Parquet: prompt/chosen/rejected, "
                    "HH-RLHF dialogues, ShareGPT conversations + chosen/rejected, or prompt/completion/label for "
                    "KTO), rendered with the chat template, loss on the response tokens only. CONFIG is a "
                    "TOML/YAML/JSON file of the method's config fields; any field can be overridden with "
                    "--field VALUE (--beta 0.05, --data.train pairs.jsonl).",
        epilog="examples:\n"
               "  lmstack align rm configs/align_rm.toml\n"
               "  lmstack align dpo configs/align_dpo.toml --loss_type ipo --beta 0.5\n"
               "  lmstack align kto configs/align_kto.toml --method full --lr 1e-5",
        formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="align_command", metavar="METHOD")
    for name, (help_text, *_rest) in METHODS.items():
        m = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                           epilog=f"examples:\n  lmstack align {name} configs/align_{name}.toml\n"
                                  f"  lmstack align {name} configs/align_{name}.toml --steps 20 --method full "
                                  f"--run_dir runs/align/{name}_full --json")
        m.add_argument("config", metavar="CONFIG", help="config file (TOML/YAML/JSON)")
        m.add_argument("--json", action="store_true", help="print the summary as JSON")
        m.set_defaults(func=cmd_align, align_method=name, accepts_overrides=True)
    p.set_defaults(func=_usage)


def _usage(args: argparse.Namespace) -> int:
    from lmstack.errors import ConfigError

    raise ConfigError(f"align: name a method ({'|'.join(METHODS)}) and a config, e.g. lmstack align dpo "
                      f"configs/align_dpo.toml")


def cmd_align(args: argparse.Namespace) -> int:
    _, run, load, render = METHODS[args.align_method]
    cfg = _resolve(load)(args.config, list(getattr(args, "overrides", []) or []))
    results = _resolve(run)(cfg)
    print(json.dumps(results, indent=2, default=str) if args.json else _resolve(render)(results))
    return 0
