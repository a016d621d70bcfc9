"""The built-in default corpus: English technical prose that every machine with Python already has.

Sources, read from the running interpreter's standard library (no download, no import of the modules):

- ``docstrings``: module, class and function docstrings of the stdlib's ``.py`` files, found by parsing
  each file with :mod:`ast` (tests, ``idlelib``, ``lib2to3`` and ``site-packages`` are skipped);
- ``topics``: ``pydoc_data.topics``, the language reference sections that ``help()`` shows (the
  Python documentation's own prose: the data model, statements, operators...).
- ``code`` (off by default): the stdlib source files themselves, for a code-flavoured corpus.

Cleaning: reST roles (``:func:`x``` -> ``x``) are simplified and doctest-heavy or very short texts
dropped while reading; then every document goes through the data pipeline's own steps
(:mod:`lmstack.data.clean`: Unicode, boilerplate, table rules, language, quality, PII; then exact and
MinHash near-duplicate removal from :mod:`lmstack.data.dedup`) and the one held-out rule
(:func:`lmstack.data.split.is_heldout`). The result depends only on the Python version, so two machines
with the same Python build the same corpus.

Output: ``train.jsonl`` and ``valid.jsonl`` (``{"text", "source"}`` per line) and ``stats.json``, which
holds per-source counts and, under ``steps``, what each cleaning step removed (counts by reason and
examples), as ``data prepare``'s report does.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from lmstack.data.clean import CleanConfig, build_steps
from lmstack.data.dedup import DedupConfig
from lmstack.data.pipeline import clean_and_split, step_table
from lmstack.data.sources import Document
from lmstack.data.split import heldout_hash
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
    # the data pipeline's cleaning steps (lmstack.data.clean), in order, then exact + near dedup
    steps: tuple[str, ...] = ("unicode", "boilerplate", "tables", "language", "quality", "pii")
    # the steps for a user's own ``inputs`` (any language, any kind of text): lighter, then the same dedup
    input_steps: tuple[str, ...] = ("unicode", "boilerplate")
    min_words: int = 10                # the quality filter's floor (docstrings are short; Gopher's 50 drops most)
    near_dup_threshold: float = 0.7    # MinHash Jaccard at which two documents are near duplicates
    seed: int = 0                      # of the held-out hash

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


def build_default_corpus(out_dir: str | Path, config: CorpusConfig | None = None) -> dict[str, Any]:
    """The built-in corpus (stdlib docstrings, pydoc topics, optionally code) -> ``out_dir``; return the stats."""
    config = config or CorpusConfig()
    readers = {"docstrings": lambda: _docstrings(config), "topics": _topics, "code": lambda: _code(config)}

    def documents():
        for source in config.sources:
            for text, origin in readers[source]():
                yield Document(text, source, origin, "code" if source == "code" else "text")

    return build_corpus(documents(), out_dir, config, config.steps)


def build_user_corpus(inputs: list[str], out_dir: str | Path, config: CorpusConfig | None = None,
                      text_field: str = "text") -> dict[str, Any]:
    """A user's files/folders/globs (:func:`lmstack.sources.iter_documents`) -> ``out_dir``, through
    ``config.input_steps`` and dedup; return the stats."""
    from lmstack.sources import iter_documents

    config = config or CorpusConfig()
    docs = (Document(text, "user", "user", "text") for text in iter_documents(inputs, text_field))
    return build_corpus(docs, out_dir, config, config.input_steps, min_chars=0)


def build_corpus(documents: Iterable[Document], out_dir: str | Path, config: CorpusConfig,
                 steps: Sequence[str], min_chars: int | None = None) -> dict[str, Any]:
    """Clean (``steps`` of :mod:`lmstack.data.clean`), dedup (exact + MinHash) and split (``is_heldout``)
    ``documents``; write ``train.jsonl``, ``valid.jsonl`` and ``stats.json`` under ``out_dir``.
    Texts shorter than ``min_chars`` (default ``config.min_chars``; a user's own inputs keep every text)
    are skipped first."""
    min_chars = config.min_chars if min_chars is None else min_chars
    out_dir = Path(out_dir)
    clean = CleanConfig()
    clean.quality.min_words = config.min_words
    clean.quality.min_stop_words = 1   # two of eight stop words is too strict for one-paragraph docstrings
    dedup = DedupConfig(threshold=config.near_dup_threshold).make_steps(2)
    text_steps = build_steps(clean, steps) + dedup
    code_steps = build_steps(clean, ("unicode", "code", "pii")) + dedup
    stats: dict[str, Any] = {"python": sys.version.split()[0], "sources": {}, "removed": {"short": 0}}
    step_stats: dict[str, Any] = {}

    def long_enough(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if len(doc.text) < min_chars:
                stats["removed"]["short"] += 1
            else:
                yield doc

    # the corpus is a few MB, so it is held in memory until the split is known
    docs = list(clean_and_split(long_enough(documents), lambda d: code_steps if d.kind == "code" else text_steps,
                                step_stats, config.valid_fraction, config.seed, max_examples=2))
    if len(docs) < 2:
        raise DataError(f"the corpus came out with {len(docs)} document(s) after cleaning; it needs at least 2 "
                        f"(add text, or relax corpus.min_chars / corpus.steps / corpus.input_steps)")
    if not any(held for _, held in docs):  # always hold out one document, the one whose hash is lowest
        first = min(range(len(docs)), key=lambda i: heldout_hash(docs[i][0].text, config.seed))
        docs[first] = (docs[first][0], True)
    for doc, _ in docs:
        counts = stats["sources"].setdefault(doc.source, {"documents": 0, "chars": 0, "bytes": 0})
        counts["documents"] += 1
        counts["chars"] += len(doc.text)
        counts["bytes"] += len(doc.text.encode("utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "train.jsonl") as train_tmp, atomic_path(out_dir / "valid.jsonl") as valid_tmp:
        with open(train_tmp, "w", encoding="utf-8") as train_f, open(valid_tmp, "w", encoding="utf-8") as valid_f:
            for doc, held in docs:
                line = json.dumps({"text": doc.text, "source": doc.origin}, ensure_ascii=False) + "\n"
                (valid_f if held else train_f).write(line)
    stats["steps"] = [st.to_dict() for st in step_stats.values()]
    stats["removed"].update({st["name"]: sum(st["removed"].values()) for st in stats["steps"]})
    stats["documents"] = sum(s["documents"] for s in stats["sources"].values())
    stats["bytes"] = sum(s["bytes"] for s in stats["sources"].values())
    stats["train_bytes"] = (out_dir / "train.jsonl").stat().st_size
    stats["valid_bytes"] = (out_dir / "valid.jsonl").stat().st_size
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


def corpus_report(stats: dict[str, Any]) -> str:
    """Markdown: documents per source, then each cleaning step's removals with an example of each reason."""
    rows = "\n".join(f"| {name} | {s['documents']:,} | {s['bytes'] / 1e6:.2f} |" for name, s in stats["sources"].items())
    out = [f"Documents: **{stats['documents']:,}**, {stats['bytes'] / 1e6:.2f} MB of text.", "",
           "| source | documents | MB |", "|---|---:|---:|", rows]
    if stats.get("steps"):
        short = stats.get("removed", {}).get("short", 0)
        out += ["", f"Cleaning (the data pipeline's steps; {short:,} texts under min_chars were skipped on reading):",
                "", step_table(stats["steps"])]
    return "\n".join(out) + "\n"
