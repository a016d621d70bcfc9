"""Words and their counts, and a corpus as arrays of word ids, read in one streaming pass over any lmstack source.

Text comes from :func:`lmstack.sources.iter_documents` (text files, JSONL/JSON/Parquet rows, folders, globs; the
speedrun's ``corpus/train.jsonl`` is a JSONL source). Each non-empty line of a document is one sentence: windows
never cross a line, as in word2vec.c (a newline ends a sentence) and gensim's ``LineSentence``.

One pass gives both the counts and the corpus: each word gets a provisional id the first time it is seen, the
running text is kept as int32 provisional ids (4 bytes a word), and at the end the vocabulary (by count,
ties by first appearance) maps provisional ids to final ids, dropping words under ``min_count`` as word2vec does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmstack.embed.config import VocabConfig
from lmstack.errors import DataError


@dataclass
class Vocab:
    """Words sorted by descending count (id 0 is the most frequent), their counts, and the word -> id map."""

    words: list[str]
    counts: np.ndarray                      # int64, one per word
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index


@dataclass
class Corpus:
    """The training text as word ids: ``ids[k]`` is a word, ``sentence[k]`` the (non-decreasing) sentence it is in."""

    ids: np.ndarray        # int32
    sentence: np.ndarray   # int32 (or int64 for huge corpora)

    @property
    def words(self) -> int:
        return int(self.ids.size)


def word_splitter(cfg: VocabConfig) -> Callable[[str], list[str]]:
    """The function that turns one line of text into words, per ``cfg.split``."""
    if cfg.split == "tokenizer":
        return _token_splitter(cfg.tokenizer)
    if cfg.split == "whitespace":
        if cfg.lowercase:
            return lambda line: line.lower().split()
        return str.split
    findall = re.compile(cfg.pattern).findall
    if cfg.lowercase:
        return lambda line: findall(line.lower())
    return findall


def _token_splitter(path: str) -> Callable[[str], list[str]]:
    """Tokens of an lmstack tokenizer as words. A token's word is its text with whitespace shown as ``▁`` (so the
    word2vec text format, which separates fields by spaces, can hold it); tokens whose text collides (partial
    UTF-8 bytes all decode to U+FFFD) get their id appended."""
    from lmstack.tokenizer import load_tokenizer

    if not Path(path).exists():
        raise DataError(f"vocab.tokenizer: {path}: no such file or folder")
    tok = load_tokenizer(path)
    names: dict[int, str] = {}
    taken: set[str] = set()

    def name(i: int) -> str:
        if i not in names:
            text = "".join("▁" if ch.isspace() else ch for ch in tok.decode([i])) or f"<{i}>"
            if text in taken:
                text = f"{text}#{i}"
            taken.add(text)
            names[i] = text
        return names[i]

    return lambda line: [name(i) for i in tok.encode(line)]


def iter_sentences(inputs: Iterable[str | os.PathLike] | str | os.PathLike, split: Callable[[str], list[str]],
                   text_field: str = "text") -> Iterator[list[str]]:
    """The words of every non-empty line of every document of ``inputs`` (streamed)."""
    from lmstack.sources import iter_documents

    for doc in iter_documents(inputs, text_field):
        for line in doc.splitlines():
            words = split(line)
            if words:
                yield words


def build_corpus(inputs: Iterable[str | os.PathLike] | str | os.PathLike | Iterable[list[str]],
                 cfg: VocabConfig | None = None) -> tuple[Vocab, Corpus]:
    """The vocabulary and the id corpus of ``inputs``: paths (files, folders, globs), or already split sentences
    (lists of words, used as they are). Raises :class:`DataError` for an empty corpus and for a vocabulary that
    ``min_count`` leaves empty."""
    cfg = cfg or VocabConfig()
    sentences = _sentences(inputs, cfg)
    provisional: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    buf: list[int] = []
    for words in sentences:
        get = provisional.setdefault
        buf.extend(get(w, len(provisional)) for w in words)
        lengths.append(len(words))
        if len(buf) >= 1 << 20:
            chunks.append(np.asarray(buf, dtype=np.int32))
            buf = []
    chunks.append(np.asarray(buf, dtype=np.int32))
    raw = np.concatenate(chunks)
    if raw.size == 0:
        raise DataError("corpus: no words found in the input; give text files, JSONL rows or sentences with words")
    counts = np.bincount(raw, minlength=len(provisional)).astype(np.int64)
    # by descending count; a stable sort keeps first appearance first among equal counts
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] >= cfg.min_count]
    if cfg.max_vocab:
        order = order[: cfg.max_vocab]
    if order.size == 0:
        raise DataError(f"vocab.min_count: no word occurs {cfg.min_count} times or more "
                        f"({raw.size:,} words, {len(provisional):,} distinct, the most frequent "
                        f"{int(counts.max())} times); lower min_count or give more text")
    names = list(provisional)
    remap = np.full(len(provisional), -1, dtype=np.int64)
    remap[order] = np.arange(order.size)
    vocab = Vocab([names[i] for i in order], counts[order])
    sentence = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    ids = remap[raw]
    keep = ids >= 0
    sent_dtype = np.int32 if len(lengths) < 2**31 else np.int64
    return vocab, Corpus(ids[keep].astype(np.int32), sentence[keep].astype(sent_dtype))


def _sentences(inputs, cfg: VocabConfig) -> Iterator[list[str]]:
    if isinstance(inputs, (str, os.PathLike)):
        return iter_sentences(inputs, word_splitter(cfg), cfg.text_field)
    items = list(inputs)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        return (list(map(str, s)) for s in items if s)
    return iter_sentences(items, word_splitter(cfg), cfg.text_field)


def check_window(vocab: Vocab, window: int, field_name: str) -> None:
    """A window at least as wide as the vocabulary has no real context: every word would be every word's neighbour."""
    if len(vocab) <= window:
        raise DataError(f"{field_name}: the window ({window}) is not smaller than the vocabulary ({len(vocab)} "
                        f"words); lower the window, lower vocab.min_count or give more text")
