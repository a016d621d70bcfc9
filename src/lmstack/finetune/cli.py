"""``lmstack finetune CONFIG --method ...`` and ``lmstack finetune merge RUN --out DIR``: thin wrappers over
:func:`lmstack.finetune.run.finetune` and :func:`lmstack.finetune.run.merge_run`."""

from __future__ import annotations

import argparse
import json

from lmstack.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    p = subparsers.add_parser(
        "finetune", help="supervised fine-tuning: full, LoRA, QLoRA, prefix tuning, adapters; merge LoRA",
        description="Fine-tune a pre-trained model (an lmstack model folder or a Hugging Face folder) on chat "
                    "data (JSONL/JSON/Parquet rows with 'messages', or 'instruction'/'input'/'output'); the "
                    "loss is on assistant tokens only. Without data.train, SFT data is generated from the "
                    "Python standard library's docstrings. CONFIG is a TOML/YAML/JSON file of FinetuneConfig "
                    "fields; any field can be overridden with --field VALUE (--lora.r 16, --data.train x.jsonl).\n\n"
                    "'lmstack finetune merge RUN --out DIR' folds a LoRA/QLoRA run's adapter into its base and "
                    "writes a plain model (--hf: a Hugging Face folder that transformers loads).",
        epilog="examples:\n"
               "  lmstack finetune configs/finetune_tiny.toml --method lora\n"
               "  lmstack finetune configs/finetune_tiny.toml --method qlora --quant.mode nf4 --steps 300\n"
               "  lmstack finetune configs/finetune_tiny.toml --method adapter --adapter.placement pfeiffer\n"
               "  lmstack finetune configs/finetune_tiny.toml --base runs/pretrain --data.train data/sft.jsonl\n"
               "  lmstack finetune merge runs/finetune --out runs/merged --hf",
        formatter_class=HelpFormatter)
    p.add_argument("config", metavar="CONFIG|merge", help="a config file, or 'merge'")
    p.add_argument("run", metavar="RUN", nargs="?", help="merge: the fine-tuning run directory")
    p.add_argument("--method", choices=["full", "lora", "qlora", "prefix", "adapter"], default=None,
                   help="the fine-tuning method (default: the config's, else lora)")
    p.add_argument("--base", default=None, help="the base model folder (overrides the config; merge: default is "
                                                "the base recorded in the run)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--out", default=None, help="merge: the output folder")
    p.add_argument("--hf", action="store_true", help="merge: write a Hugging Face folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_finetune, accepts_overrides=True)


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmstack.finetune.run import finetune, main_config, merge_run, render_report

    overrides = list(getattr(args, "overrides", []) or [])
    if args.config == "merge":
        if not args.run or not args.out:
            raise ConfigError("usage: lmstack finetune merge RUN --out DIR [--base FOLDER] [--hf]")
        out = merge_run(args.run, args.out, base=args.base, hf_format=args.hf)
        print(f"merged {args.run} -> {out}" + (" (Hugging Face format)" if args.hf else ""))
        return 0
    if args.run:
        raise ConfigError(f"unexpected argument {args.run!r} (only 'merge' takes a RUN)")
    if args.method:
        overrides += ["--method", args.method]
    if args.base:
        overrides += ["--base", args.base]
    cfg = main_config(args.config, overrides)
    results = finetune(cfg, resume=args.resume)
    print(json.dumps(results, indent=2) if args.json else render_report(results))
    return 0
