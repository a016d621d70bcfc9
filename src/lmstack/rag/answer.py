"""Grounded extractive answers with numbered citations, abstention, and citation verification.

:func:`answer` builds an answer from the retrieved chunks alone, without a model: it splits each hit's chunk
into sentences (:func:`lmstack.rag.chunk.sentence_spans`) and scores each sentence by

    score = |question content words in the sentence| / (1 + rank of its chunk)      (rank 0 = the best hit)

where content words are the layer's tokens (:func:`lmstack.rag.bm25.tokenize`) without
``ENGLISH_STOPWORDS``, counted once each. The best ``max_sentences`` sentences (ties: better-ranked chunk,
then earlier sentence) are returned in that order, each followed by ``[n]``, ``n`` the 1-based position of
its chunk in ``Answer.sources`` (the cited hits, in retrieval order).

It abstains ("I don't know") when there is no hit, when the best hit's score is below ``min_score`` (the
score scale is the retriever's: BM25 is unbounded, cosine is at most 1; calibrate it per retriever), or when
no sentence shares a content word with the question.

:func:`render_prompt` writes the numbered-sources prompt a generator would get for the same hits.
:func:`verify` checks each cited sentence of an answer (ours or a model's) against the chunk it cites: an
exact match (case-insensitive, whitespace collapsed) scores 100; otherwise, when at least ``min_coverage`` of
the sentence's content words occur in the chunk, a fuzzy partial match (``rapidfuzz.fuzz.partial_ratio`` when
rapidfuzz is installed, else difflib's matched-character ratio), else 0. A sentence is supported when its best
score over the chunks it cites reaches ``threshold`` (0-100). The word check keeps a near-duplicate sentence
that differs in its key words ("alpha1 ..." against "alpha2 ...") from passing on characters alone.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmstack.errors import ConfigError
from lmstack.rag.bm25 import ENGLISH_STOPWORDS, tokenize
from lmstack.rag.chunk import Chunk, sentence_spans
from lmstack.rag.index import Hit

IDK = "I don't know"


@dataclass
class Source:
    """A cited chunk: its number in the answer, ids, retrieval score and where it comes from."""
    n: int
    chunk_id: str
    doc_id: str
    source: str
    score: float
    start: int
    end: int
    text: str


@dataclass
class Answer:
    text: str
    sources: list[Source] = field(default_factory=list)
    abstained: bool = False
    reason: str = ""


@dataclass
class SentenceCheck:
    sentence: str
    citations: list[int]
    supported: bool
    score: float  # 100 exact, else the best fuzzy score over the cited chunks (0: no citation or too few words)
    why: str = ""


@dataclass
class Verification:
    checks: list[SentenceCheck]

    @property
    def all_supported(self) -> bool:
        return all(c.supported for c in self.checks)

    @property
    def supported_text(self) -> str:
        """The answer with every unsupported sentence dropped."""
        return " ".join(f"{c.sentence} {''.join(f'[{n}]' for n in c.citations)}" for c in self.checks if c.supported)


def content_words(text: str) -> set[str]:
    return set(tokenize(text, ENGLISH_STOPWORDS))


def _squash(text: str) -> str:
    return " ".join(text.split())


def answer(question: str, hits: Sequence[Hit], *, min_score: float = 0.0, max_sentences: int = 2) -> Answer:
    """An extractive answer from ``hits`` (best first) with ``[n]`` citations, or an abstention with a reason."""
    if max_sentences < 1:
        raise ConfigError(f"answer max_sentences must be >= 1, got {max_sentences}")
    if not hits:
        return Answer(IDK, [], True, f"{IDK}: nothing was retrieved")
    best = max(h.score for h in hits)
    if best < min_score:
        return Answer(IDK, [], True, f"{IDK}: the best retrieval score {best:.3g} is below min_score {min_score:g}")
    q = content_words(question)
    if not q:
        return Answer(IDK, [], True, f"{IDK}: the question has no content word")
    scored: list[tuple[float, int, int, str]] = []  # (-score, rank, sentence start, sentence)
    for rank, hit in enumerate(hits):
        text = hit.chunk.text
        for s, e in sentence_spans(text):
            sentence = _squash(text[s:e])
            overlap = len(q & content_words(sentence))
            if overlap:
                scored.append((-overlap / (1 + rank), rank, s, sentence))
    if not scored:
        return Answer(IDK, [], True, f"{IDK}: no sentence shares a content word with the question")
    picked = sorted(scored)[:max_sentences]
    ranks = sorted({r for _, r, _, _ in picked})
    number = {r: i + 1 for i, r in enumerate(ranks)}
    sources = [Source(number[r], hits[r].chunk.id, hits[r].chunk.doc_id, hits[r].chunk.source, hits[r].score,
                      hits[r].chunk.start, hits[r].chunk.end, hits[r].chunk.text) for r in ranks]
    text = " ".join(f"{sentence} [{number[r]}]" for _, r, _, sentence in picked)
    return Answer(text, sources, False, f"{len(picked)} sentence(s) from {len(sources)} source(s)")


def render_prompt(question: str, hits: Sequence[Hit]) -> str:
    """The prompt a generator gets: instructions, the hits numbered [1].. in rank order, the question."""
    lines = [("Answer the question using only the numbered sources below. After each sentence, cite the source it "
             f"comes from as [n]. If the sources do not contain the answer, reply \"{IDK}\"."), ""]
    for i, hit in enumerate(hits, 1):
        where = hit.chunk.source + (f" > {' > '.join(hit.chunk.heading)}" if hit.chunk.heading else "")
        lines.append(f"[{i}] ({where})")
        lines.append(hit.chunk.text.strip())
        lines.append("")
    lines += [f"Question: {question.strip()}", "Answer:"]
    return "\n".join(lines)


_CITED = re.compile(r"(.*?)((?:\s*\[\d+\])+)")
_NUM = re.compile(r"\[(\d+)\]")


def split_cited(answer_text: str) -> list[tuple[str, list[int]]]:
    """``(sentence, [cited numbers])`` pairs; text after the last citation is a sentence without citation."""
    out: list[tuple[str, list[int]]] = []
    pos = 0
    for m in _CITED.finditer(answer_text):
        if not m.group(0).strip():
            continue
        out.append((_squash(m.group(1)), [int(n) for n in _NUM.findall(m.group(2))]))
        pos = m.end()
    rest = _squash(answer_text[pos:])
    if rest:
        out.append((rest, []))
    return [(s, c) for s, c in out if s]


def _fuzzy(sentence: str, text: str) -> float:
    """0-100: how well ``sentence`` matches some span of ``text``."""
    try:
        from rapidfuzz import fuzz
    except ImportError:
        m = difflib.SequenceMatcher(None, sentence, text, autojunk=False)
        return 100.0 * sum(b.size for b in m.get_matching_blocks()) / max(len(sentence), 1)
    return float(fuzz.partial_ratio(sentence, text))


def _source_text(source: Source | Hit | Chunk | str) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, Hit):
        return source.chunk.text
    return source.text


def _coverage(sentence: str, text: str) -> float:
    """The share of the sentence's content words that occur in ``text`` (1.0 without content words)."""
    words = content_words(sentence)
    return len(words & content_words(text)) / len(words) if words else 1.0


def verify(answer_text: str, sources: Sequence[Source | Hit | Chunk | str], *, threshold: float = 90.0,
           min_coverage: float = 0.9) -> Verification:
    """Check each sentence against the source(s) it cites (``[n]`` = ``sources[n-1]``); see the module doc."""
    if not 0 <= threshold <= 100:
        raise ConfigError(f"verify threshold must be in 0..100, got {threshold}")
    if not 0 <= min_coverage <= 1:
        raise ConfigError(f"verify min_coverage must be in 0..1, got {min_coverage}")
    texts = [_squash(_source_text(s)) for s in sources]

    def support(sentence: str, text: str) -> float:
        low, tlow = sentence.lower(), text.lower()
        if low in tlow:
            return 100.0
        # a fuzzy character match alone passes near-duplicates that differ in the key words (names, numbers)
        return _fuzzy(low, tlow) if _coverage(sentence, text) >= min_coverage else 0.0

    checks = []
    for sentence, cited in split_cited(answer_text):
        if sentence.strip().rstrip(".") == IDK:
            continue
        if not cited:
            checks.append(SentenceCheck(sentence, [], False, 0.0, "no citation"))
            continue
        bad = [n for n in cited if not 1 <= n <= len(texts)]
        if bad:
            checks.append(SentenceCheck(sentence, cited, False, 0.0, f"cites [{bad[0]}] but there are "
                                        f"{len(texts)} sources"))
            continue
        score = max(support(sentence, texts[n - 1]) for n in cited)
        ok = score >= threshold
        checks.append(SentenceCheck(sentence, cited, ok, score, "" if ok else
                                    f"best match {score:.0f} < {threshold:g} in the cited source"))
    return Verification(checks)
