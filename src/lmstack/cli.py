"""The ``lmstack`` command. Thin: it parses arguments and calls each layer's public API.

Each layer owns its subcommands in ``lmstack/<layer>/cli.py`` with a ``register(subparsers)`` function;
this file lists those modules in data-flow order. A handler returns an exit code; a user error
(:class:`lmstack.errors.LmstackError`) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from lmstack import __version__
from lmstack.clihelp import HelpFormatter
from lmstack.errors import LmstackError

# Subcommand groups, in data-flow order. Each module has register(subparsers).
LAYER_CLIS = [
    "lmstack.tokenizer.cli",
    "lmstack.data.cli",
    "lmstack.embed.cli",
    "lmstack.model.cli",
    "lmstack.compress.cli",
    "lmstack.infer.cli",
    "lmstack.train.cli",
    "lmstack.finetune.cli",
    "lmstack.align.cli",
    "lmstack.eval.cli",
    "lmstack.rag.cli",
    "lmstack.prompts.cli",
    "lmstack.monitor.cli",
    "lmstack.serve.cli",
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except LmstackError as e:
        return _fail(_with_speedrun_hint(str(e)))
    except BrokenPipeError:  # `lmstack ... | head`: the reader has gone; stop quietly like any Unix tool
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except UnicodeDecodeError as e:  # a data file that is not UTF-8, read by code that cannot name it
        return _fail(f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8")
    except OSError as e:
        if e.filename is None:  # not about a user's path: a bug or the system; keep the traceback
            raise
        return _fail(f"{e.filename}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        # a training run stopped by SIGINT/SIGTERM says which (exit 128 + signal: 130 or 143, as a shell does)
        signum = getattr(e, "signum", 2)
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 128 + int(signum)


def _fail(message: str) -> int:
    """The one place a user error is printed: one line on stderr, exit code 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _with_speedrun_hint(message: str) -> str:
    """The shipped configs (train, finetune, scaling) read the speedrun's outputs under runs/speedrun/; when
    one of those is missing, say how to make it."""
    from lmstack.speedrun import SpeedrunConfig

    default = SpeedrunConfig.run_dir
    if default in message and not (Path(default) / "report.md").is_file():
        return (f"{message.rstrip('.')} ({default}/ is written by `lmstack speedrun`: run it first, or point the "
                f"config at your own files)")
    return message


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at devnull so that flush cannot raise a second time
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


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
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = code or 141
    sys.exit(code)


if __name__ == "__main__":
    entrypoint()
