"""The README's commands are tests: every `lmstack ...` line in its code blocks must parse to a command.

This catches documentation drift (a renamed flag, a removed subcommand) without running the commands."""

import re
import shlex
from pathlib import Path

import pytest

from lmstack.cli import build_parser, split_overrides

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [ln.split("  #")[0].strip() for block in blocks for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith(("lmstack ", "torchrun "))]


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in first_block.strip().splitlines()] == ["make run", "make test"]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        argv = argv[argv.index("lmstack.cli") + 1:]
    else:
        argv = argv[1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    assert getattr(args, "func", None), f"{command!r} names no command"
    if getattr(args, "accepts_overrides", False):
        kept, _ = split_overrides(argv, {e.split("=", 1)[0] for e in extra if e.startswith("--")})
        parser.parse_args(kept)
    else:
        assert not extra, f"{command!r}: unknown arguments {extra}"
