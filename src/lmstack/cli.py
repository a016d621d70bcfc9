"""The ``lmstack`` command. Thin: it parses arguments and calls each layer's public API.

Each layer owns its subcommands in ``lmstack/<layer>/cli.py`` with a ``register(subparsers)`` function;
this file lists those modules in data-flow order. A handler returns an exit code; a user error
(:class:`lmstack.errors.LmstackError`) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmstack import __version__
from lmstack.clihelp import HelpFormatter
from lmstack.errors import LmstackError

# Subcommand groups, in data-flow order. Each module has register(subparsers).
LAYER_CLIS = [
    "lmstack.tokenizer.cli",
    "lmstack.data.cli",
    "lmstack.model.cli",
    "lmstack.infer.cli",
    "lmstack.train.cli",
    "lmstack.finetune.cli",
    "lmstack.eval.cli",
    "lmstack.speedrun",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmstack",
        description="lmstack: a PyTorch-native LLM engineering stack (tokenizer -> model -> train -> infer ...).",
        epilog="examples:\n  lmstack speedrun                 # the main job on the built-in corpus\n"
               "  lmstack tokenizer train --help\n  lmstack model info tiny",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lmstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in LAYER_CLIS:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lmstack never reaches for a hub
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        kept, overrides = split_overrides(argv, {e.split("=", 1)[0] for e in extra if e.startswith("--")})
        args = parser.parse_args(kept)  # again, so an override's value is never taken for a positional
        args.overrides = overrides
    try:
        return int(args.func(args) or 0)
    except LmstackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def split_overrides(argv: list[str], names: set[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides (``--key value`` / ``--key=value`` for keys argparse does not know)."""
    kept: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.split("=", 1)[0] in names:
            if "=" in token or i + 1 >= len(argv):
                overrides.append(token)
                i += 1
            else:
                overrides += [token, argv[i + 1]]
                i += 2
        else:
            kept.append(token)
            i += 1
    return kept, overrides


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
