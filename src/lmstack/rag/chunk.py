"""Chunkers: split a :class:`~lmstack.rag.documents.Document` into :class:`Chunk` s with exact offsets.

Every chunker satisfies ``doc.text[chunk.start:chunk.end] == chunk.text`` and fills the chunk's heading path
from the document's sections (the headings in force where the chunk starts).

- :class:`TokenChunker`: fixed windows of ``size`` tokens, consecutive windows sharing ``overlap`` tokens.
  Tokens are whitespace-separated words by default, or an lmstack tokenizer's tokens (a byte-level one:
  offsets come from ``token_bytes``; a window edge inside a multi-byte character moves to the next character).
- :class:`RecursiveChunker`: pieces of at most ``max_chars`` characters, split at the coarsest separator that
  works: Markdown headings, blank lines (paragraphs), line breaks (code, tables), sentence ends, whitespace,
  and as a last resort a hard cut (one huge word, CJK text without punctuation).
- :class:`SentenceChunker`: whole sentences packed up to ``max_chars``, ``overlap`` sentences repeated between
  neighbours; a sentence longer than ``max_chars`` is split recursively.
- :class:`WholeChunker`: one chunk per document (short documents such as SQuAD paragraphs).
- :class:`SemanticChunker`: sentences grouped, split where neighbouring sentences' embeddings drift apart.
- :class:`ParentChildChunker`: small child chunks to index, each knowing its enclosing parent chunk;
  :func:`parent_hits` returns the parents of retrieved children.

Chunks are stripped of leading/trailing whitespace (offsets follow) and whitespace-only chunks are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Protocol, runtime_checkable

from lmstack.errors import ConfigError
from lmstack.rag.documents import Document


@dataclass
class Chunk:
    id: str
    doc_id: str
    source: str
    start: int
    end: int
    text: str
    heading: tuple[str, ...] = ()
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "doc_id": self.doc_id, "source": self.source, "start": self.start, "end": self.end,
                "text": self.text, "heading": list(self.heading), "title": self.title, "metadata": self.metadata}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Chunk:
        return cls(row["id"], row["doc_id"], row["source"], row["start"], row["end"], row["text"],
                   tuple(row.get("heading", ())), row.get("title", ""), dict(row.get("metadata", {})))


@runtime_checkable
class Chunker(Protocol):
    def chunk(self, doc: Document) -> list[Chunk]: ...


def make_chunks(doc: Document, spans: Sequence[tuple[int, int]]) -> list[Chunk]:
    """Chunks for character ``spans`` of ``doc``: whitespace stripped, empty ones dropped, ids ``doc#n``."""
    out = []
    for s, e in spans:
        piece = doc.text[s:e]
        s += len(piece) - len(piece.lstrip())
        e -= len(piece) - len(piece.rstrip())
        if e <= s:
            continue
        out.append(Chunk(f"{doc.id}#{len(out)}", doc.id, doc.source, s, e, doc.text[s:e], doc.heading_at(s),
                         doc.title, dict(doc.metadata)))
    return out


def token_spans(text: str, tokenizer: Any = None) -> list[tuple[int, int]]:
    """Character spans of the tokens of ``text``: whitespace words, or an lmstack byte-level tokenizer's tokens."""
    if tokenizer is None:
        return [m.span() for m in re.finditer(r"\S+", text)]
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    data = text.encode("utf-8")
    if b"".join(pieces) != data:
        raise ConfigError("chunker tokenizer: its tokens do not concatenate to the text (not byte-level); use a "
                          "byte-level BPE tokenizer or the whitespace default")
    # char index of each byte offset (a byte inside a multi-byte char maps to the char after it)
    char_at = [0] * (len(data) + 1)
    b = 0
    for ci, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        char_at[b] = ci
        for j in range(1, n):
            char_at[b + j] = ci + 1
        b += n
    char_at[len(data)] = len(text)
    spans, b = [], 0
    for p in pieces:
        spans.append((char_at[b], char_at[b + len(p)]))
        b += len(p)
    return spans


@dataclass
class TokenChunker:
    size: int = 256
    overlap: int = 32
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"chunker size must be >= 1 token, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"chunker overlap must be in 0..{self.size - 1} (below the size {self.size}), got {self.overlap}")

    def chunk(self, doc: Document) -> list[Chunk]:
        spans = token_spans(doc.text, self.tokenizer)
        step = self.size - self.overlap
        windows = []
        for first in range(0, len(spans), step):
            last = min(first + self.size, len(spans)) - 1
            windows.append((spans[first][0], spans[last][1]))
            if last == len(spans) - 1:
                break
        return make_chunks(doc, windows)


# Separators, coarsest first: each is a regex whose match *end* is a split point (headings split before them).
SEPARATORS: dict[str, str] = {
    "heading": r"\n(?=#{1,6}[ \t])",
    "paragraph": r"\n[ \t]*\n\s*",
    "line": r"\n",
    "sentence": r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？；])",
    "word": r"\s+",
}


def _split_points(text: str, start: int, end: int, pattern: re.Pattern) -> list[int]:
    return [m.end() for m in pattern.finditer(text, start, end) if start < m.end() < end]


@dataclass
class RecursiveChunker:
    max_chars: int = 1000
    separators: tuple[str, ...] = ("heading", "paragraph", "line", "sentence", "word")

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ConfigError(f"chunker max_chars must be >= 1, got {self.max_chars}")
        unknown = [s for s in self.separators if s not in SEPARATORS]
        if unknown:
            raise ConfigError(f"chunker separators: unknown {unknown}; use {', '.join(SEPARATORS)}")
        self._patterns = [re.compile(SEPARATORS[s]) for s in self.separators]

    def spans(self, text: str, start: int = 0, end: int | None = None, level: int = 0) -> list[tuple[int, int]]:
        """Contiguous spans tiling ``text[start:end]``, each at most ``max_chars`` long."""
        end = len(text) if end is None else end
        if end - start <= self.max_chars:
            return [(start, end)] if end > start else []
        if level >= len(self._patterns):  # nothing left to split at: hard cuts
            return [(s, min(s + self.max_chars, end)) for s in range(start, end, self.max_chars)]
        cuts = [start, *_split_points(text, start, end, self._patterns[level]), end]
        out: list[tuple[int, int]] = []
        cur = None  # the span being packed
        for a, b in pairwise(cuts):
            if b - a > self.max_chars:
                if cur:
                    out.append(cur)
                    cur = None
                out += self.spans(text, a, b, level + 1)
            elif cur and b - cur[0] <= self.max_chars:
                cur = (cur[0], b)
            else:
                if cur:
                    out.append(cur)
                cur = (a, b)
        if cur:
            out.append(cur)
        return out

    def chunk(self, doc: Document) -> list[Chunk]:
        return make_chunks(doc, self.spans(doc.text))


_SENTENCE_END = re.compile(SEPARATORS["sentence"] + r"|\n[ \t]*\n\s*")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Contiguous spans of ``text``, one per sentence (a sentence ends at ``.!?`` + space, CJK stops, blank lines)."""
    cuts = [0, *_split_points(text, 0, len(text), _SENTENCE_END), len(text)]
    return [(a, b) for a, b in pairwise(cuts) if b > a]


@dataclass
class SentenceChunker:
    max_chars: int = 1000
    overlap: int = 0  # sentences repeated at the start of the next chunk

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ConfigError(f"chunker max_chars must be >= 1, got {self.max_chars}")
        if self.overlap < 0:
            raise ConfigError(f"chunker overlap must be >= 0 sentences, got {self.overlap}")

    def chunk(self, doc: Document) -> list[Chunk]:
        splitter = RecursiveChunker(self.max_chars, ("line", "word"))
        units: list[tuple[int, int]] = []
        for a, b in sentence_spans(doc.text):
            units += splitter.spans(doc.text, a, b) if b - a > self.max_chars else [(a, b)]
        windows, i = [], 0
        while i < len(units):
            j = i + 1
            while j < len(units) and units[j][1] - units[i][0] <= self.max_chars:
                j += 1
            windows.append((units[i][0], units[j - 1][1]))
            if j >= len(units):
                break
            i = max(j - self.overlap, i + 1)
        return make_chunks(doc, windows)


@dataclass
class WholeChunker:
    def chunk(self, doc: Document) -> list[Chunk]:
        return make_chunks(doc, [(0, len(doc.text))])


@dataclass
class SemanticChunker:
    """Split between sentences where the meaning shifts: where the cosine distance between neighbouring
    sentences' embeddings is in the top ``100 - percentile`` % of the document's distances (or above
    ``threshold`` when set), and wherever a chunk would pass ``max_chars``.

    ``embed`` maps a list of texts to normalised vectors (``Embedder.embed_documents``)."""

    embed: Any
    max_chars: int = 1000
    percentile: float = 90.0
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ConfigError(f"chunker max_chars must be >= 1, got {self.max_chars}")
        if not 0 <= self.percentile <= 100:
            raise ConfigError(f"semantic chunker percentile must be in [0, 100], got {self.percentile}")

    def chunk(self, doc: Document) -> list[Chunk]:
        import numpy as np

        splitter = RecursiveChunker(self.max_chars, ("line", "word"))
        units: list[tuple[int, int]] = []
        for a, b in sentence_spans(doc.text):
            if doc.text[a:b].strip():
                units += splitter.spans(doc.text, a, b) if b - a > self.max_chars else [(a, b)]
        if len(units) <= 1:
            return make_chunks(doc, units)
        vecs = np.asarray(self.embed([doc.text[a:b].strip() for a, b in units]), dtype=np.float64)
        dist = 1.0 - (vecs[:-1] * vecs[1:]).sum(1)          # between unit i and i + 1
        cut = self.threshold if self.threshold is not None else float(np.percentile(dist, self.percentile))
        windows, start = [], 0
        for i in range(1, len(units)):
            if dist[i - 1] > cut or units[i][1] - units[start][0] > self.max_chars:
                windows.append((units[start][0], units[i - 1][1]))
                start = i
        windows.append((units[start][0], units[-1][1]))
        return make_chunks(doc, windows)


@dataclass
class ParentChildChunker:
    """Retrieve small, return the enclosing section: ``parent`` chunks the document (e.g. a
    ``RecursiveChunker(2000)``), ``child`` chunks each parent; the children are what gets indexed, each with
    ``metadata["parent"] = {"id", "start", "end", "text"}`` (offsets into the document).
    :func:`parent_hits` turns child hits into their parents."""

    parent: Any
    child: Any

    def chunk(self, doc: Document) -> list[Chunk]:
        out: list[Chunk] = []
        for p in self.parent.chunk(doc):
            sub = Document(p.id, p.text, doc.source, doc.title, [], dict(doc.metadata))
            for c in self.child.chunk(sub):
                start, end = p.start + c.start, p.start + c.end
                meta = {**doc.metadata, "parent": {"id": p.id, "start": p.start, "end": p.end, "text": p.text,
                                                    "heading": list(p.heading)}}
                out.append(Chunk(f"{doc.id}#{len(out)}", doc.id, doc.source, start, end, doc.text[start:end],
                                 doc.heading_at(start), doc.title, meta))
        return out


def parent_hits(hits: Sequence[Any]) -> list[Any]:
    """Child hits (``Hit(chunk, score)``) as their parent chunks, each parent once at its best child's rank."""
    from lmstack.rag.index import Hit

    seen: set[str] = set()
    out = []
    for h in hits:
        p = h.chunk.metadata.get("parent")
        if p is None:
            raise ConfigError(f"chunk {h.chunk.id!r} has no parent: index chunks from a ParentChildChunker")
        if p["id"] in seen:
            continue
        seen.add(p["id"])
        meta = {k: v for k, v in h.chunk.metadata.items() if k != "parent"}
        out.append(Hit(Chunk(p["id"], h.chunk.doc_id, h.chunk.source, p["start"], p["end"], p["text"],
                             tuple(p["heading"]), h.chunk.title, meta), h.score))
    return out


CHUNKERS = {"recursive": RecursiveChunker, "sentence": SentenceChunker, "tokens": TokenChunker,
            "semantic": SemanticChunker, "parent": ParentChildChunker, "none": WholeChunker}


def make_chunker(name: str, size: int | None = None, overlap: int | None = None, embed: Any = None) -> Chunker:
    """A chunker by CLI name: ``recursive``/``sentence``/``semantic`` (size in chars), ``tokens`` (size in
    words), ``parent`` (children of ``size`` chars, default 400, in recursive parents 4x larger), ``none``.
    ``semantic`` needs ``embed`` (texts -> normalised vectors)."""
    if name not in CHUNKERS:
        raise ConfigError(f"--chunker: unknown {name!r}; use {', '.join(CHUNKERS)}")
    if name == "none":
        return WholeChunker()
    if name == "semantic":
        if embed is None:
            raise ConfigError("the semantic chunker needs an embedder")
        return SemanticChunker(embed, size or 1000)
    if name == "parent":
        child = size or 400
        return ParentChildChunker(RecursiveChunker(4 * child), SentenceChunker(child, overlap or 0))
    if name == "tokens":
        return TokenChunker(size or 256, 32 if overlap is None else overlap)
    if name == "sentence":
        return SentenceChunker(size or 1000, overlap or 0)
    return RecursiveChunker(size or 1000)


def chunk_documents(docs: Sequence[Document], chunker: Chunker) -> list[Chunk]:
    return [c for d in docs for c in chunker.chunk(d)]
