"""The built-in default corpus: English technical prose that every machine with Python already has.

Sources, read from the running interpreter's standard library (no download, no import of the modules):

- ``docstrings``: module, class and function docstrings of the stdlib's ``.py`` files, found by parsing
  each file with :mod:`ast` (tests, ``idlelib``, ``lib2to3`` and ``site-packages`` are skipped);
- ``topics``: ``pydoc_data.topics``, the language reference sections that ``help()`` shows (the
  Python documentation's own prose: the data model, statements, operators...).
- ``code`` (off by default): the stdlib source files themselves, for a code-flavoured corpus.

Cleaning: reST roles (``:func:`x``` -> ``x``) and doctest-heavy text are simplified, very short texts
dropped, whitespace normalised, and exact duplicates (after normalisation) removed. The result depends
only on the Python version, so two machines with the same Python build the same corpus.

Output: ``train.jsonl`` and ``valid.jsonl`` (``{"text", "source"}`` per line; a document goes to
``valid`` when its hash falls in the held-out fraction, so the split is stable) and ``stats.json``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import ConfigError, DataError
from lmstack.runs import atomic_path, atomic_write_json

SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


@dataclass
class CorpusConfig:
    sources: tuple[Literal["docstrings", "topics", "code"], ...] = ("docstrings", "topics")
    min_chars: int = 80               # shorter texts carry little prose
    max_doctest_fraction: float = 0.5  # drop docstrings that are mostly ">>> " examples
    valid_fraction: float = 0.05
    max_code_bytes: int = 4_000_000

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("corpus.sources: name at least one of docstrings, topics, code")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ConfigError("corpus.valid_fraction: must be in [0, 0.5)")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_dir()
    return sorted(f for f in root.rglob("*.py") if not (set(f.relative_to(root).parts[:-1]) & SKIP_PARTS))


_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")     # :func:`os.path.join` -> os.path.join
_LITERAL = re.compile(r"``([^`]+)``")                       # ``x`` -> x


def clean_docstring(text: str, max_doctest_fraction: float = 0.5) -> str | None:
    """Simplify reST markup and normalise whitespace; None when the text is mostly doctest examples."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    doctest = sum(1 for ln in lines if ln.lstrip().startswith((">>>", "...")))
    if doctest / len(lines) > max_doctest_fraction:
        return None
    text = _ROLE.sub(r"\1", "\n".join(ln.rstrip() for ln in lines))
    text = _LITERAL.sub(r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _docstrings(config: CorpusConfig):
    root = stdlib_dir()
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    cleaned = clean_docstring(doc, config.max_doctest_fraction)
                    if cleaned:
                        yield cleaned, f"docstring:{path.relative_to(root)}"


def _topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds drop pydoc_data
        return
    for name in sorted(topics):
        yield topics[name].strip(), f"topic:{name}"


def _code(config: CorpusConfig):
    root, total = stdlib_dir(), 0
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        total += len(text)
        if total > config.max_code_bytes:
            return
        yield text, f"code:{path.relative_to(root)}"


def _normalised_hash(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def build_default_corpus(out_dir: str | Path, config: CorpusConfig | None = None) -> dict[str, Any]:
    """Write ``train.jsonl``, ``valid.jsonl`` and ``stats.json`` under ``out_dir``; return the stats."""
    config = config or CorpusConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    readers = {"docstrings": lambda: _docstrings(config), "topics": _topics, "code": lambda: _code(config)}
    seen: set[bytes] = set()
    stats: dict[str, Any] = {"python": sys.version.split()[0], "sources": {}, "removed": {"short": 0, "duplicate": 0}}
    docs: list[tuple[int, str, str]] = []  # (hash key, text, origin); the corpus is a few MB, so it fits in memory
    for source in config.sources:
        counts = stats["sources"].setdefault(source, {"documents": 0, "chars": 0, "bytes": 0})
        for text, origin in readers[source]():
            if len(text) < config.min_chars:
                stats["removed"]["short"] += 1
                continue
            h = _normalised_hash(text)
            if h in seen:
                stats["removed"]["duplicate"] += 1
                continue
            seen.add(h)
            docs.append((int.from_bytes(h[:4], "little"), text, origin))
            counts["documents"] += 1
            counts["chars"] += len(text)
            counts["bytes"] += len(text.encode("utf-8"))
    if len(docs) < 2:
        raise DataError("the default corpus came out with fewer than 2 documents; check corpus.sources/min_chars")
    # a document is held out when its hash falls in the held-out fraction, so the split does not depend on
    # the order of files; at least one document is always held out
    threshold = int(config.valid_fraction * 2**32)
    held = {i for i, (key, _, _) in enumerate(docs) if key < threshold}
    if not held:
        held = {min(range(len(docs)), key=lambda i: docs[i][0])}
    with atomic_path(out_dir / "train.jsonl") as train_tmp, atomic_path(out_dir / "valid.jsonl") as valid_tmp:
        with open(train_tmp, "w", encoding="utf-8") as train_f, open(valid_tmp, "w", encoding="utf-8") as valid_f:
            for i, (_, text, origin) in enumerate(docs):
                line = json.dumps({"text": text, "source": origin}, ensure_ascii=False) + "\n"
                (valid_f if i in held else train_f).write(line)
    stats["documents"] = sum(s["documents"] for s in stats["sources"].values())
    stats["bytes"] = sum(s["bytes"] for s in stats["sources"].values())
    stats["train_bytes"] = (out_dir / "train.jsonl").stat().st_size
    stats["valid_bytes"] = (out_dir / "valid.jsonl").stat().st_size
    atomic_write_json(out_dir / "stats.json", stats)
    return stats
