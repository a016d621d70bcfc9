"""lmstack.rag.chunk: exact offsets, sizes and heading paths on boundary cases (empty, one huge word, CJK, code,
tables) for every chunker."""

from __future__ import annotations

import pytest

from lmstack.errors import ConfigError
from lmstack.rag.chunk import (
    Chunker,
    RecursiveChunker,
    SentenceChunker,
    TokenChunker,
    WholeChunker,
    make_chunker,
    sentence_spans,
)
from lmstack.rag.documents import Document, markdown_sections

MD = ("# Title\n\nFirst paragraph. It has two sentences.\n\n## Part A\n\nAlpha beta gamma delta. Epsilon zeta!\n\n"
      "| col1 | col2 |\n|------|------|\n| 1    | 2    |\n| 3    | 4    |\n\n## Part B\n\n```python\ndef f(x):\n"
      "    return x * 2\n```\n\nThe end?  Yes.\n")
CJK = "自然语言处理是人工智能的一个分支。它研究人与计算机之间的交互！机器翻译很有用？" * 3
HUGE = "x" * 2500
CASES = {"empty": "", "blank": " \n\n  \t", "markdown": MD, "cjk": CJK, "huge_word": HUGE,
         "huge_word_in_text": f"start {HUGE} end.", "code": "def f():\n    return 1\n" * 40}


def doc(text: str) -> Document:
    return Document("d", text, "d.md", "T", markdown_sections(text))


CHUNKERS = [TokenChunker(8, 3), TokenChunker(1, 0), RecursiveChunker(60), RecursiveChunker(1), SentenceChunker(60),
            SentenceChunker(60, overlap=1), WholeChunker()]


@pytest.mark.parametrize("chunker", CHUNKERS, ids=lambda c: repr(c)[:40])
@pytest.mark.parametrize("name", list(CASES))
def test_offsets_are_exact_and_nothing_is_lost(chunker: Chunker, name: str):
    text = CASES[name]
    d = doc(text)
    chunks = chunker.chunk(d)
    assert isinstance(chunker, Chunker)
    for c in chunks:
        assert text[c.start:c.end] == c.text and c.text.strip() == c.text and c.text
        assert c.doc_id == "d" and c.source == "d.md" and c.heading == d.heading_at(c.start)
    assert len({c.id for c in chunks}) == len(chunks)
    if not text.strip():
        assert chunks == []
    # every non-space character is in some chunk
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    limit = getattr(chunker, "max_chars", None)
    if limit:
        assert all(len(c.text) <= limit for c in chunks)


def test_token_windows_overlap_and_size():
    text = " ".join(f"w{i}" for i in range(20))
    chunks = TokenChunker(8, 3).chunk(doc(text))
    words = [c.text.split() for c in chunks]
    assert words[0] == [f"w{i}" for i in range(8)] and words[1][0] == "w5" and words[-1][-1] == "w19"
    assert all(len(w) == 8 for w in words[:-1]) and all(a[-3:] == b[:3] for a, b in zip(words, words[1:]))


def test_token_windows_with_a_byte_level_tokenizer():
    from lmstack.tokenizer import train_bpe

    tok = train_bpe(["hello world, this is text. " * 20, "日本語のテキスト。" * 10], vocab_size=300)
    text = "hello world 日本語のテキスト。 this is text."
    chunks = TokenChunker(5, 2, tok).chunk(doc(text))
    assert chunks and all(text[c.start:c.end] == c.text for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(len(tok.encode(c.text)) <= 6 for c in chunks)  # a window edge inside a character moves one token


def test_recursive_prefers_coarse_separators_and_keeps_headings():
    chunks = RecursiveChunker(80).chunk(doc(MD))
    starts = [c.text.split("\n")[0] for c in chunks]
    assert "## Part A" in starts and "## Part B" in starts  # splits at headings before anything finer
    table = next(c for c in chunks if "| col1" in c.text)
    assert table.heading == ("Title", "Part A") and table.text.startswith("| col1")
    code = next(c for c in chunks if "def f" in c.text)
    assert code.heading == ("Title", "Part B")


def test_huge_word_is_cut_hard_and_cjk_splits_at_stops():
    chunks = RecursiveChunker(1000).chunk(doc(HUGE))
    assert [len(c.text) for c in chunks] == [1000, 1000, 500]
    cjk = RecursiveChunker(40).chunk(doc(CJK))
    assert all(c.text.endswith(("。", "！", "？")) for c in cjk)
    a, b = sentence_spans(CJK)[0]
    assert CJK[a:b] == "自然语言处理是人工智能的一个分支。"


def test_sentence_chunker_packs_whole_sentences_with_overlap():
    text = "One. Two two. Three three three. Four four four four. Five."
    chunks = SentenceChunker(30, overlap=1).chunk(doc(text))
    assert [c.text for c in chunks] == ["One. Two two.", "Two two. Three three three.",
                                        "Three three three.", "Four four four four. Five."]


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="overlap must be in 0..7"):
        TokenChunker(8, 8)
    with pytest.raises(ConfigError, match="unknown 'x'"):
        make_chunker("x")
    with pytest.raises(ConfigError, match="separators: unknown"):
        RecursiveChunker(10, ("heading", "bogus"))


def topic_embed(texts):
    """A stand-in embedder: a sentence about cats points one way, about the stock market another."""
    import numpy as np

    out = []
    for t in texts:
        v = np.array([1.0, 0.05]) if "cat" in t.lower() else np.array([0.05, 1.0])
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_semantic_chunker_splits_where_the_topic_changes():
    from lmstack.rag.chunk import SemanticChunker

    text = ("Cats sleep a lot. A cat purrs. Cats hunt mice. The stock market fell. Shares dropped sharply. "
            "Investors sold bonds. My cat is back.")
    chunks = SemanticChunker(topic_embed, max_chars=1000, threshold=0.5).chunk(doc(text))
    assert [c.text for c in chunks] == ["Cats sleep a lot. A cat purrs. Cats hunt mice.",
                                        "The stock market fell. Shares dropped sharply. Investors sold bonds.",
                                        "My cat is back."]
    assert all(text[c.start:c.end] == c.text for c in chunks)
    small = SemanticChunker(topic_embed, max_chars=40, threshold=0.5).chunk(doc(text))
    assert all(len(c.text) <= 40 for c in small) and len(small) > 3
    for name, t in CASES.items():
        for c in SemanticChunker(topic_embed, max_chars=60).chunk(doc(t)):
            assert t[c.start:c.end] == c.text and len(c.text) <= 60, name


def test_parent_child_chunks_return_their_section():
    from lmstack.rag.chunk import ParentChildChunker, parent_hits
    from lmstack.rag.index import BM25Index

    d = doc(MD)
    chunker = ParentChildChunker(RecursiveChunker(120), SentenceChunker(40))
    children = chunker.chunk(d)
    assert all(MD[c.start:c.end] == c.text and c.heading == d.heading_at(c.start) for c in children)
    for c in children:
        p = c.metadata["parent"]
        assert MD[p["start"]:p["end"]] == p["text"] and p["start"] <= c.start < c.end <= p["end"]
    index = BM25Index()
    index.add(children)
    hits = index.search("alpha beta gamma delta", 5)
    parents = parent_hits(hits)
    assert hits[0].chunk.text.endswith("Alpha beta gamma delta.") and "Epsilon zeta!" in parents[0].chunk.text
    assert len(parents[0].chunk.text) > len(hits[0].chunk.text)
    assert len({h.chunk.id for h in parents}) == len(parents) and parents[0].chunk.heading == ("Title", "Part A")
    assert parents[0].score == hits[0].score
