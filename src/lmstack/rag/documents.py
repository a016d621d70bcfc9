"""Documents for retrieval: text, Markdown, HTML, JSONL/JSON/Parquet rows, PDF; files, folders and globs.

A :class:`Document` keeps its ``id``, ``source`` (the file, or ``file:line`` for a row), ``title`` and the
heading structure as ``sections``: ``(char offset, heading path)`` pairs, so any character offset of ``text``
maps to the headings above it (:meth:`Document.heading_at`). Markdown headings (``#`` .. ``######``) give the
sections; a PDF gives one section per page (``("page 3",)``).

Rows come from the one structured-row reader, :func:`lmstack.sources.iter_file_rows`; HTML main text from the
data layer's extractor (:func:`lmstack.data.sources.html_to_text`). Empty documents and binary files (NUL
bytes, not UTF-8, an unreadable PDF page set) are skipped and counted in :class:`LoadReport`; when nothing is
left the loader raises one :class:`~lmstack.errors.DataError` saying what was skipped.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.sources import ROW_SUFFIXES, TEXT_SUFFIXES, expand_paths, iter_file_rows, row_suffix

SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".jsonl.gz", ".json", ".parquet", ".pdf")
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


@dataclass
class Document:
    id: str
    text: str
    source: str
    title: str = ""
    sections: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)  # sorted by offset
    metadata: dict[str, Any] = field(default_factory=dict)

    def heading_at(self, offset: int) -> tuple[str, ...]:
        """The heading path in force at character ``offset`` (``()`` before the first heading)."""
        starts = [s for s, _ in self.sections]
        i = bisect.bisect_right(starts, offset) - 1
        return self.sections[i][1] if i >= 0 else ()


@dataclass
class LoadReport:
    """What a load kept and skipped (the CLI prints it)."""
    documents: int = 0
    empty: int = 0
    binary: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason", for the first few

    def skip(self, kind: str, where: str, reason: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.skipped) < 20:
            self.skipped.append(f"{where}: {reason}")

    def summary(self) -> str:
        return f"{self.documents} documents ({self.empty} empty, {self.binary} binary skipped)"


def markdown_sections(text: str) -> list[tuple[int, tuple[str, ...]]]:
    """``(offset of the heading line, heading path)`` for each ATX heading outside code fences."""
    fences = [m.start() for m in re.finditer(r"^(```|~~~)", text, re.MULTILINE)]
    out: list[tuple[int, tuple[str, ...]]] = []
    stack: list[tuple[int, str]] = []
    for m in _MD_HEADING.finditer(text):
        if bisect.bisect_right(fences, m.start()) % 2:  # inside a fenced code block: a comment, not a heading
            continue
        level = len(m.group(1))
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, m.group(2).strip()))
        out.append((m.start(), tuple(t for _, t in stack)))
    return out


def _is_binary(data: bytes) -> str | None:
    """Why ``data`` is not text (NUL bytes, not UTF-8), or None."""
    if b"\x00" in data[:8192]:
        return "binary (NUL bytes)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"binary or not UTF-8 (byte {e.start})"
    return None


def _pdf_document(path: Path, report: LoadReport) -> Document | None:
    from lmstack.extras import require

    pypdf = require("pypdf", "reading PDF files")
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files
        raise DataError(f"{path}: cannot read PDF ({type(e).__name__}: {e})") from None
    text, sections = "", []
    for i, page in enumerate(pages, 1):
        if not page.strip():
            continue
        if text:
            text += "\n\n"
        sections.append((len(text), (f"page {i}",)))
        text += page
    if not text.strip():
        report.skip("empty", str(path), "no extractable text (a scanned PDF needs OCR first)")
        return None
    meta = reader.metadata or {}
    title = str(getattr(meta, "title", None) or path.stem)
    return Document(str(path), text, str(path), title, sections, {"pages": len(pages)})


def _text_document(path: Path, report: LoadReport, html_engine: str) -> Document | None:
    data = path.read_bytes()
    why = _is_binary(data)
    if why:
        report.skip("binary", str(path), why)
        return None
    text = data.decode("utf-8")
    suffix = path.suffix.lower()
    title, sections = path.stem, []
    if suffix in (".html", ".htm"):
        from lmstack.data.sources import html_to_text

        m = _HTML_TITLE.search(text)
        title = " ".join(m.group(1).split()) if m and m.group(1).strip() else title
        text = html_to_text(text, engine=html_engine)
    elif suffix in (".md", ".markdown"):
        sections = markdown_sections(text)
        h1 = next((p[0] for _, p in sections if len(p) == 1), None)
        title = h1 or title
    if not text.strip():
        report.skip("empty", str(path), "empty")
        return None
    return Document(str(path), text, str(path), title, sections)


def _row_documents(path: Path, report: LoadReport, text_field: str, id_field: str,
                   title_field: str) -> Iterator[Document]:
    for n, (where, row) in enumerate(iter_file_rows(path)):
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{where}: row has no {text_field!r} field (set --text-field)")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            report.skip("empty", where, "empty text")
            continue
        doc_id = row.get(id_field)
        meta = {k: v for k, v in row.items() if k not in (text_field, id_field, title_field)
                and isinstance(v, (str, int, float, bool))}
        yield Document(str(doc_id) if doc_id is not None else where, text, where, str(row.get(title_field) or ""),
                       [], meta)


def _files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files under ``paths``: folders searched recursively for known suffixes (PDF included), globs expanded."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")
                           and (f.suffix.lower() in SUFFIXES or row_suffix(f)))
            if not found:
                raise DataError(f"{path}: the folder holds no {'/'.join(SUFFIXES)} file")
            files += found
        else:
            files += expand_paths([p])
    return files


def iter_documents(paths: Iterable[str | os.PathLike] | str | os.PathLike, report: LoadReport | None = None,
                   text_field: str = "text", id_field: str = "id", title_field: str = "title",
                   html_engine: str = "trafilatura") -> Iterator[Document]:
    """Stream the documents under ``paths``; skipped ones are counted in ``report``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else LoadReport()
    for path in _files(paths):
        if row_suffix(path) in ROW_SUFFIXES:
            docs: Iterable[Document | None] = _row_documents(path, report, text_field, id_field, title_field)
        elif path.suffix.lower() == ".pdf":
            docs = [_pdf_document(path, report)]
        else:
            docs = [_text_document(path, report, html_engine)]
        for doc in docs:
            if doc is not None:
                report.documents += 1
                yield doc


def load_documents(paths: Iterable[str | os.PathLike] | str | os.PathLike, **options: Any
                   ) -> tuple[list[Document], LoadReport]:
    """All documents under ``paths`` and the load report; a DataError when none is left, or ids repeat."""
    report = LoadReport()
    docs = list(iter_documents(paths, report, **options))
    if not docs:
        where = ", ".join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))
        first = f"; first: {report.skipped[0]}" if report.skipped else ""
        raise DataError(f"{where}: no document with text ({report.empty} empty, {report.binary} binary "
                        f"skipped{first})")
    seen: dict[str, str] = {}
    for d in docs:
        if d.id in seen:
            raise DataError(f"{d.source}: document id {d.id!r} repeats {seen[d.id]}; ids must be unique")
        seen[d.id] = d.source
    return docs, report
