"""Documents for the data pipeline: :mod:`lmstack.sources` streams plus a kind per document, and HTML to text.

A :class:`Document` carries its text, the config source it belongs to, where it came from (``file`` or
``file:row``) and its kind, which picks the cleaning steps: ``html`` pages are extracted to text first,
``book`` text gets page-number/running-header/hyphenation cleanup, ``code`` gets code cleanup and skips
the prose heuristics, ``text`` is everything else.

HTML to text: :func:`html_to_text` uses trafilatura (content extraction by text/link density, which keeps
the article and drops menus, headers, footers and sidebars far better than tag rules alone) and falls back
to :func:`html_to_text_basic`, a standard-library parser that drops script/style/nav/header/footer/aside/
form elements and elements whose class or id names boilerplate (cookie banners, menus, share bars).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmstack.errors import DataError
from lmstack.sources import expand_paths, iter_file_documents

KINDS = ("auto", "text", "html", "book", "code")
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
CODE_SUFFIXES = {".py", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".go",
                 ".rs", ".rb", ".php", ".cs", ".swift", ".kt", ".scala", ".sh", ".lua", ".r", ".jl", ".sql",
                 ".css", ".pl", ".hs", ".m", ".zig"}
_LOOKS_HTML = re.compile(r"\A\s*(?:<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])", re.IGNORECASE)


@dataclass(slots=True)
class Document:
    text: str
    source: str = ""   # the name of the config source it was read for
    origin: str = ""   # file, or file:row for JSONL/Parquet/JSON rows
    kind: str = "text"  # text | html | book | code


def detect_kind(path: Path, text: str, default: str = "text") -> str:
    """The kind of one document: by suffix (HTML, code), by content (a JSONL row holding a page), else ``default``."""
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES or _LOOKS_HTML.match(text[:200]):
        return "html"
    if suffix in CODE_SUFFIXES:
        return "code"
    return default


def iter_source(paths: Iterable[str | os.PathLike] | str | os.PathLike, name: str = "", kind: str = "auto",
                text_field: str = "text", max_documents: int = 0) -> Iterator[Document]:
    """Stream :class:`Document` s from files, folders and globs (one at a time: corpora larger than memory work).

    ``kind="auto"`` detects HTML and code per document and calls the rest ``text``; any other kind is
    applied to every document. ``max_documents > 0`` stops after that many. Raises :class:`DataError` for
    missing paths, empty files, non-UTF-8 text and sources that hold no text at all.
    """
    if kind not in KINDS:
        raise DataError(f"source {name!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    files = expand_paths(paths)
    count = 0
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        rows = path.suffix.lower() in (".jsonl", ".json", ".parquet")
        for i, text in enumerate(iter_file_documents(path, text_field)):
            if not text.strip():
                continue
            doc_kind = detect_kind(path, text) if kind == "auto" else kind
            yield Document(text, name, f"{path}:{i + 1}" if rows else str(path), doc_kind)
            count += 1
            if max_documents and count >= max_documents:
                return
    if count == 0:
        raise DataError(f"source {name!r}: no text found in {', '.join(map(str, files))}")


# ---------------------------------------------------------------------------------------------------------
# HTML to text

def html_to_text(page: str, engine: str = "trafilatura", include_tables: bool = True) -> str:
    """Main text of an HTML page with boilerplate removed; ``""`` when the page has no main text.

    ``engine="trafilatura"`` uses trafilatura and falls back to :func:`html_to_text_basic` where it finds
    nothing (very short pages) or is not installed; ``engine="basic"`` uses the fallback only.
    """
    if engine == "trafilatura":
        try:
            import trafilatura
        except ImportError:  # the fallback keeps the pipeline working without it
            trafilatura = None
        if trafilatura is not None:
            out = trafilatura.extract(page, include_comments=False, include_tables=include_tables,
                                      include_links=False, include_images=False, deduplicate=False)
            if out and out.strip():
                return out.strip()
    elif engine != "basic":
        raise DataError(f"html engine: unknown {engine!r}; use trafilatura or basic")
    return html_to_text_basic(page)


_SKIP_TAGS = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg", "template",
              "iframe", "button", "select", "head", "menu"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
               "table", "tr", "blockquote", "pre", "br", "hr", "dd", "dt", "dl", "figcaption", "td", "th"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}
# class/id words that mark page furniture rather than content
_BOILERPLATE_ATTR = re.compile(
    r"(?:^|[\s_-])(?:cookie|consent|banner|nav|navbar|menu|sidebar|breadcrumbs?|footer|header|share|social|"
    r"advert|ads?|promo|newsletter|popup|modal|related|comments?|subscribe)(?:$|[\s_-])", re.IGNORECASE)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # the tag of the element being skipped
        self.skip_depth = 0               # nesting of that tag inside the skipped element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        marker = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role"))
        if tag in _SKIP_TAGS or (marker and _BOILERPLATE_ATTR.search(marker)):
            if tag not in _VOID_TAGS:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data)


def html_to_text_basic(page: str) -> str:
    """A dependency-free extractor: drops non-content elements and joins the rest, one block per line."""
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    text = "".join(parser.parts)  # entities were decoded by the parser (convert_charrefs)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return "\n".join(line for line in lines if line)
