"""``lmstack align ppo|grpo CONFIG``: online RL with verifiable rewards (thin wrappers over
:func:`lmstack.align.online.run_online`). Heavy modules load inside the handlers: ``--help`` stays fast."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    group = subparsers.add_parser(
        "align", help="alignment: PPO and GRPO with verifiable rewards", formatter_class=HelpFormatter,
        description="Align a fine-tuned model. 'grpo' and 'ppo' sample responses to prompts with the policy, "
                    "score them (exact numeric answer, the <think>...</think> then '#### N' format, code that "
                    "passes tests, a reward model) and update the policy on the one trainer; held-out exact "
                    "match before/after, the reward curve and the rollout/update time split go to the run's "
                    "report.md.",
        epilog="examples:\n"
               "  lmstack align grpo configs/grpo_arith.toml --base runs/sft\n"
               "  lmstack align ppo configs/grpo_arith.toml --base runs/sft --steps 40\n"
               "  lmstack align grpo configs/grpo_gsm8k.toml --method lora --grpo.loss_type dr_grpo")
    sub = group.add_subparsers(dest="align_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    register_online(sub)


def register_online(sub: argparse._SubParsersAction) -> None:
    """The ``ppo`` and ``grpo`` subcommands (the alignment group's online half)."""
    from lmstack.clihelp import HelpFormatter

    for algo, what in (("grpo", "GRPO: group-normalised advantages, clipped ratio, k3 KL to the reference"),
                       ("ppo", "PPO: value head, GAE, clipped policy and value losses, per-token KL penalty")):
        p = sub.add_parser(
            algo, help=what, formatter_class=HelpFormatter,
            description=f"{what}. CONFIG is a TOML/YAML/JSON file of OnlineConfig fields (see docs/align_online.md);"
                        f" any field can be overridden with --field VALUE (--rollout.num_samples 8, --grpo.beta 0).",
            epilog="examples:\n"
                   f"  lmstack align {algo} configs/{algo}.toml --base runs/sft\n"
                   f"  lmstack align {algo} configs/{algo}.toml --method lora --steps 20 --resume")
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
