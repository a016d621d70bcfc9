"""``lmstack train`` and ``lmstack scaling``: thin wrappers over :mod:`lmstack.train`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, positive_float

    p = sub.add_parser(
        "train",
        help="pre-train a model (causal LM, masked LM, span corruption, distillation); resume a run",
        description="Train a model from a config (TOML/YAML/JSON), with --section.key value overrides.\n"
                    "`lmstack train resume RUN_DIR` continues a run from its newest checkpoint.\n"
                    "Launch with torchrun for several processes (set --dist.strategy ddp|fsdp|tp|pp).",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  lmstack train configs/train_tiny.toml\n"
               "  lmstack train configs/train_tiny.toml --steps 1000 --optim.lr 1e-3 --run_dir runs/t2\n"
               "  lmstack train configs/train_tiny.toml --data.train 'data/*.jsonl' --model.n_layer 6\n"
               "  lmstack train configs/train_tiny.toml --objective mlm --run_dir runs/mlm\n"
               "  lmstack train configs/train_tiny.toml --objective distill --teacher runs/big --run_dir runs/kd\n"
               "  lmstack train configs/train_tiny.toml --fresh      # start runs/train_tiny over\n"
               "  lmstack train resume runs/tiny                    # after a crash, Ctrl-C or SIGTERM\n"
               "  lmstack train resume runs/tiny --steps 2000       # train longer\n"
               "  torchrun --nproc-per-node 2 -m lmstack.cli train configs/train_tiny.toml --dist.strategy fsdp\n",
    )
    p.add_argument("config", help="config file, or the word 'resume'")
    p.add_argument("run_dir", nargs="?", help="with 'resume': the run directory to continue")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a run directory that already holds a run (deletes its checkpoints)")
    p.set_defaults(func=_cli_train, accepts_overrides=True)

    s = sub.add_parser(
        "scaling",
        help="scaling laws: sweep small models x token budgets, fit L(N, D), compute-optimal sizes",
        description="Chinchilla-style scaling laws: `sweep` trains a grid of models, `fit` fits\n"
                    "L(N, D) = E + A/N^alpha + B/D^beta to its results and reports N_opt, D_opt per FLOP budget.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  lmstack scaling sweep --run_dir runs/scaling --train.data.train runs/speedrun/corpus/train.jsonl\n"
               "  lmstack scaling fit runs/scaling --budget 1e18 --budget 1e20\n",
    )
    ss = s.add_subparsers(dest="scaling_command", metavar="COMMAND")
    sw = ss.add_parser(
        "sweep", help="train every (model size, token budget) pair of a sweep config",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  lmstack scaling sweep configs/scaling_tiny.toml\n"
               "  lmstack scaling sweep --run_dir runs/scaling --train.data.train corpus/train.jsonl "
               "--tokens '[20000, 40000, 80000]'\n",
    )
    sw.add_argument("config", nargs="?", help="sweep config (TOML/YAML/JSON); defaults otherwise")
    sw.set_defaults(func=_cli_sweep, accepts_overrides=True)
    ft = ss.add_parser(
        "fit", help="fit the Chinchilla law to a sweep and report compute-optimal N and D",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  lmstack scaling fit runs/scaling\n"
               "  lmstack scaling fit results.jsonl --budget 6e20     # rows with params, tokens, loss\n",
    )
    ft.add_argument("source", help="a sweep run directory (its sweep.jsonl) or a JSONL file of {params, tokens, loss}")
    ft.add_argument("--budget", type=positive_float, action="append", help="FLOP budget(s) to report (repeatable)")
    ft.set_defaults(func=_cli_fit)


def _cli_train(args: argparse.Namespace) -> int:
    from lmstack.errors import ConfigError
    from lmstack.train.config import load_train_config

    overrides = list(args.overrides or [])
    try:
        if args.config == "resume":
            if not args.run_dir:
                raise ConfigError("train resume: name the run directory, e.g. lmstack train resume runs/tiny")
            if args.fresh:
                raise ConfigError("train resume: --fresh contradicts resume; use `lmstack train CFG --fresh`")
            from lmstack.train.trainer import resume_run

            summary = resume_run(args.run_dir, overrides)
        else:
            if args.run_dir:
                raise ConfigError(f"train: unexpected argument {args.run_dir!r} (set the output with --run_dir DIR)")
            cfg = load_train_config(args.config, overrides)   # validated before torch is imported
            from lmstack.train.trainer import existing_run, pretrain

            what = existing_run(cfg.run_dir)
            if what and not args.fresh:
                raise ConfigError(f"run_dir: {cfg.run_dir} already holds a run ({what}); continue it with "
                                  f"`lmstack train resume {cfg.run_dir}`, start over with --fresh, or set --run_dir")
            summary = pretrain(cfg)
    except KeyboardInterrupt as e:  # lmstack.train.trainer.Interrupted carries the signal
        if not hasattr(e, "signum"):
            raise
        return 128 + e.signum   # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if summary:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    keys = ("steps", "tokens", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "mfu", "seconds")
    print(" ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                   for k in keys))
    print(f"run: {summary['run_dir']} (model.safetensors, metrics.jsonl, loss.png, samples.md)")


def _cli_sweep(args: argparse.Namespace) -> int:
    from lmstack.config import load_config
    from lmstack.train.scaling import SweepConfig, fit_report, plot_fit, run_sweep
    from lmstack.runs import atomic_write_text

    cfg = load_config(SweepConfig, args.config, list(args.overrides or []))
    rows = run_sweep(cfg)
    fit, report = fit_report(rows, cfg.budgets)
    root = Path(cfg.run_dir)
    atomic_write_text(root / "fit.md", report)
    plot_fit(rows, fit, root / "fit.png")
    print(report)
    print(f"sweep: {root / 'sweep.jsonl'}, fit: {root / 'fit.md'}, plot: {root / 'fit.png'}")
    return 0


def _cli_fit(args: argparse.Namespace) -> int:
    from lmstack.errors import DataError
    from lmstack.runs import atomic_write_json, read_jsonl
    from lmstack.train.scaling import fit_report, plot_fit

    src = Path(args.source)
    path = src / "sweep.jsonl" if src.is_dir() else src
    if not path.is_file():
        raise DataError(f"{path}: not found (expected a sweep directory or a JSONL file)")
    try:
        rows = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSONL ({e})") from None
    missing = [i for i, r in enumerate(rows) if not {"params", "tokens", "loss"} <= set(r)]
    if missing:
        raise DataError(f"{path}: row {missing[0] + 1} lacks params, tokens or loss")
    fit, report = fit_report(rows, args.budget or [1e18, 1e20, 1e22])
    out = path.parent
    atomic_write_json(out / "fit.json", fit.as_dict())
    plot_fit(rows, fit, out / "fit.png")
    sys.stdout.write(report)
    print(f"fit: {out / 'fit.json'}, plot: {out / 'fit.png'}")
    return 0
