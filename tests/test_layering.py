"""The layer order of DESIGN.md, enforced: a package imports only from packages before it.

Every ``import lmstack.X`` / ``from lmstack.X import`` in ``src/lmstack`` (at module top or inside a function)
is checked against the order below; the foundation modules import nothing but each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmstack"

# Rank of each top-level package/module; a module may import ranks <= its own.
FOUNDATION = ("errors", "extras", "clihelp", "config", "runs", "runtime", "sources")
ORDER = [FOUNDATION, ("tokenizer",), ("data",), ("embed",), ("model",), ("compress",), ("infer",), ("eval",), ("train",),
         ("finetune",), ("align",), ("rag",), ("prompts",), ("monitor",), ("serve",), ("speedrun",), ("cli",)]
RANK = {name: i for i, group in enumerate(ORDER) for name in group}

# Each layer's ``cli.py`` is a composition root (registered by lmstack.cli, thin: parse and call), so it may
# call any layer, like speedrun; the library code of a layer may not.
CLI_RANK = RANK["cli"]
# Known exceptions, each with its reason. Keep this list short; the fix is to move code, not to add lines.
ALLOWED = {
    # the one model-folder loader applies LoRA/prefix/adapter runs through finetune's module swaps; the
    # import happens inside load_run only, when an adapter run is loaded
    ("infer/text.py", "finetune"),
}


def lmstack_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("lmstack.")]
    return found


def test_every_package_imports_only_packages_before_it():
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        assert own in RANK, f"{rel}: package {own!r} has no place in the layer order (add it to ORDER)"
        rank = CLI_RANK if rel.name == "cli.py" else RANK[own]
        for line, target in lmstack_imports(path):
            assert target in RANK, f"{rel}:{line}: imports unknown package lmstack.{target}"
            if RANK[target] > rank and (rel.as_posix(), target) not in ALLOWED:
                violations.append(f"{rel}:{line}: {own} imports lmstack.{target}, which comes after it")
    assert not violations, "\n".join(violations)


def test_the_checker_sees_a_backwards_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from lmstack.train.trainer import Trainer\n")
    assert lmstack_imports(bad) == [(2, "train")]
    assert RANK["train"] > RANK["model"]
