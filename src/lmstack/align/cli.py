"""``lmstack align METHOD CONFIG``: reward models, DPO and KTO (offline) and GRPO/PPO (online) runs, thin
wrappers over :mod:`lmstack.align`.

Each offline method is one entry of :data:`METHODS`: ``name -> (help, "module:run function", "module:config
loader", "module:report renderer")``; the online ones (:func:`register_online`) take ``--base``/``--method``/
``--resume`` too. Runners are imported when the subcommand runs, never at ``lmstack --help``.
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
        "align", help="alignment: reward models, DPO/IPO, KTO on preference data; GRPO and PPO with rewards",
        description="Align a fine-tuned model on preference data (JSONL/JSON/Parquet: prompt/chosen/rejected, "
                    "HH-RLHF dialogues, ShareGPT conversations + chosen/rejected, or prompt/completion/label for "
                    "KTO), rendered with the chat template, loss on the response tokens only. CONFIG is a "
                    "TOML/YAML/JSON file of the method's config fields; any field can be overridden with "
                    "--field VALUE (--beta 0.05, --data.train pairs.jsonl). 'grpo' and 'ppo' sample responses to prompts "
                    "with the policy, score them (exact numeric answer, the <think>...</think> then '#### N' format, "
                    "code that passes tests, a reward model) and update it on the same trainer.",
        epilog="examples:\n"
               "  lmstack align rm configs/align_rm.toml\n"
               "  lmstack align grpo configs/grpo_arith.toml --base runs/sft\n"
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
    register_online(sub)
    p.set_defaults(func=_usage)


def _usage(args: argparse.Namespace) -> int:
    from lmstack.errors import ConfigError

    methods = "|".join([*METHODS, "grpo", "ppo"])
    raise ConfigError(f"align: name a method ({methods}) and a config, e.g. lmstack align dpo configs/align_dpo.toml")


def cmd_align(args: argparse.Namespace) -> int:
    _, run, load, render = METHODS[args.align_method]
    cfg = _resolve(load)(args.config, list(getattr(args, "overrides", []) or []))
    results = _resolve(run)(cfg)
    print(json.dumps(results, indent=2, default=str) if args.json else _resolve(render)(results))
    return 0


def register_online(sub: argparse._SubParsersAction) -> None:
    """The ``ppo`` and ``grpo`` subcommands (the alignment group's online half)."""
    from lmstack.clihelp import HelpFormatter

    for algo, what in (("grpo", "GRPO: group-normalised advantages, clipped ratio, k3 KL to the reference"),
                       ("ppo", "PPO: value head, GAE, clipped policy and value losses, per-token KL penalty")):
        p = sub.add_parser(
            algo, help=what, formatter_class=HelpFormatter,
            description=f"{what}. CONFIG is a TOML/YAML/JSON file of OnlineConfig fields (see docs/align.md);"
                        f" any field can be overridden with --field VALUE (--rollout.num_samples 8, --grpo.beta 0).",
            epilog="examples:\n"
                   f"  lmstack align {algo} configs/grpo_arith.toml --base runs/sft\n"
                   f"  lmstack align {algo} configs/grpo_arith.toml --method lora --steps 20 --resume")
        p.add_argument("config", metavar="CONFIG", help="the run's config file")
        p.add_argument("--base", default=None, help="the policy's model folder (overrides the config)")
        p.add_argument("--method", choices=["full", "lora"], default=None, help="full fine-tuning or LoRA")
        p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
        p.add_argument("--json", action="store_true", help="print the results as JSON")
        p.set_defaults(func=cmd_online, algo=algo, accepts_overrides=True)


def cmd_online(args: argparse.Namespace) -> int:
    from lmstack.align.rl_config import load_online_config

    overrides = list(getattr(args, "overrides", []) or [])
    if args.base:
        overrides += ["--base", args.base]
    if args.method:
        overrides += ["--method", args.method]
    cfg = load_online_config(args.config, overrides, algo=args.algo)   # validated before torch loads

    from lmstack.align.online import render_report, run_online

    results = run_online(cfg, resume=args.resume)
    print(json.dumps(results, indent=2) if args.json else render_report(results))
    return 0
