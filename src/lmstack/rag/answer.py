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
    checks: list[SentenceCheck] = field(default_factory=list)  # generated answers: every sentence, kept or not
    generated: str = ""                                         # generated answers: the model's text as written


@dataclass
class SentenceCheck:
    sentence: str
    citations: list[int]
    supported: bool
    score: float  # 100 exact, else the best fuzzy score over the cited chunks (0: no citation or too few words)
    why: str = ""
    method: str = ""  # what decided: "exact", "fuzzy" (span match) or "judge" (the evaluation layer's judge)


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
    # short, so that a tiny model's window still holds the sources (docs/rag.md, "I don't know" training)
    lines = [f"Answer from the numbered sources only; cite the source of each sentence as [n]. If they do not hold "
             f"the answer, reply \"{IDK}\".", ""]
    for i, hit in enumerate(hits, 1):
        where = hit.chunk.source + (f" > {' > '.join(hit.chunk.heading)}" if hit.chunk.heading else "")
        lines.append(f"[{i}] ({where})" if where else f"[{i}]")
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
                                    f"best match {score:.0f} < {threshold:g} in the cited source",
                                    "exact" if score == 100.0 else "fuzzy"))
    return Verification(checks)


# ------------------------------------------------------------------------------------------ generated answers

@dataclass
class GenerateConfig:
    """How :func:`generate_answers` prompts, generates and checks.

    ``min_score``: abstain without generating when the best retrieval score is below it (the retriever's
    scale). ``unsupported``: ``"drop"`` removes a sentence no check supports, ``"flag"`` keeps it (its check
    says why); either way the answer abstains when no sentence is supported. ``chat``: render the prompt as a
    user turn of the model's chat template (None: when the tokenizer has one).
    """
    max_new_tokens: int = 64
    min_score: float = 0.0
    unsupported: str = "drop"
    threshold: float = 90.0
    min_coverage: float = 0.9
    chat: bool | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generate max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.unsupported not in ("drop", "flag"):
            raise ConfigError(f"generate unsupported: must be 'drop' or 'flag', got {self.unsupported!r}")


def strip_citations(text: str) -> str:
    """The answer text without its ``[n]`` markers (what exact match / F1 compare)."""
    return _squash(_NUM.sub(" ", text))


def is_abstention(text: str) -> bool:
    """True when a reply starts with "I don't know" (case and a leading quote ignored)."""
    return text.strip().lstrip("\"'").lower().startswith(IDK.lower())


def has_chat_template(tokenizer: object) -> bool:
    """A Hugging Face template in the folder, or lmstack's chat tokens (``<|user|>`` .. ``<|end|>``)."""
    from lmstack.tokenizer.chat import END_OF_TURN

    if getattr(tokenizer, "chat_template", None) is not None:
        return True
    special = getattr(tokenizer, "special_tokens", {}) or {}
    return all(t in special for t in ("<|user|>", "<|assistant|>", END_OF_TURN))


def generation_prompt(question: str, hits: Sequence[Hit], tokenizer: object, chat: bool | None = None):
    """What the model gets: :func:`render_prompt` as a user turn when it has a chat template, else as text."""
    text = render_prompt(question, hits)
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    return [{"role": "user", "content": text}] if use_chat else text


def check_generated(text: str, hits: Sequence[Hit], config: GenerateConfig | None = None, judge=None) -> Answer:
    """Parse a generated reply to the numbered-sources prompt of ``hits`` and verify it.

    Each sentence and its ``[n]`` (``n`` = the hit's number in the prompt) goes through :func:`verify`
    (exact / fuzzy span match); a sentence that fails it, cites sources in range, and a ``judge`` (an
    :class:`lmstack.eval.llm.LLM`) is given, is then asked of the judge: "is it supported by the cited
    sources?" (:func:`lmstack.rag.judged.supported`, the evaluation layer's yes/no judge). Unsupported
    sentences are dropped (or flagged); the answer abstains when the reply is "I don't know" or when no
    sentence is supported. ``Answer.sources`` holds the hits the kept sentences cite (``n`` as in the prompt).
    """
    cfg = config or GenerateConfig()
    raw = text.strip()
    if is_abstention(raw):
        return Answer(IDK, [], True, f"{IDK}: the model says the sources do not hold the answer", [], raw)
    checks = verify(raw, hits, threshold=cfg.threshold, min_coverage=cfg.min_coverage).checks
    ask = [c for c in checks if not c.supported and c.citations and all(1 <= n <= len(hits) for n in c.citations)]
    if ask and judge is not None:
        from lmstack.rag.judged import supported

        verdicts = supported(judge, [(" ".join(hits[n - 1].chunk.text for n in c.citations), c.sentence)
                                     for c in ask])
        for c, v in zip(ask, verdicts):
            c.method = "judge"
            if v:
                c.supported, c.why = True, "the judge says the cited source supports it"
            else:
                c.why = f"{c.why}; the judge says {'no' if v is False else 'nothing it could parse'}"
    kept = [c for c in checks if c.supported]
    if not kept:
        why = ("the reply has no sentence" if not checks else
               f"no sentence of the reply is supported by its cited source ({checks[0].why})")
        return Answer(IDK, [], True, f"{IDK}: {why}", checks, raw)
    shown = kept if cfg.unsupported == "drop" else checks
    numbers = sorted({n for c in kept for n in c.citations})
    sources = [Source(n, hits[n - 1].chunk.id, hits[n - 1].chunk.doc_id, hits[n - 1].chunk.source,
                      hits[n - 1].score, hits[n - 1].chunk.start, hits[n - 1].chunk.end, hits[n - 1].chunk.text)
               for n in numbers]
    body = " ".join(f"{c.sentence} {''.join(f'[{n}]' for n in c.citations)}".strip() for c in shown)
    dropped = len(checks) - len(kept)
    reason = f"{len(kept)} of {len(checks)} sentence(s) supported" + (
        f" ({dropped} {'dropped' if cfg.unsupported == 'drop' else 'flagged'})" if dropped else "")
    return Answer(body, sources, False, reason, checks, raw)


def generate_answers(questions: Sequence[str], hits: Sequence[Sequence[Hit]], model, tokenizer,
                     config: GenerateConfig | None = None, *, judge=None, batch_size: int = 16) -> list[Answer]:
    """Grounded answers generated by ``model`` (through :mod:`lmstack.infer`), checked by
    :func:`check_generated`. A question whose best hit scores below ``min_score`` (or has none) abstains
    without a model call. Greedy decoding; prompts batched ``batch_size`` at a time."""
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import complete_batch

    cfg = config or GenerateConfig()
    if len(questions) != len(hits):
        raise ConfigError(f"generate_answers: {len(questions)} questions but {len(hits)} hit lists")
    out: list[Answer | None] = [None] * len(questions)
    todo = []
    for i, h in enumerate(hits):
        if not h:
            out[i] = Answer(IDK, [], True, f"{IDK}: nothing was retrieved")
        elif (best := max(x.score for x in h)) < cfg.min_score:
            out[i] = Answer(IDK, [], True, f"{IDK}: the best retrieval score {best:.3g} is below min_score "
                                           f"{cfg.min_score:g}")
        else:
            todo.append(i)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        prompts = [generation_prompt(questions[i], hits[i], tokenizer, cfg.chat) for i in idx]
        for i, c in zip(idx, complete_batch(model, tokenizer, prompts, gen)):
            out[i] = check_generated(c.text, hits[i], cfg, judge)
    return out  # type: ignore[return-value]


def generate_answer(question: str, hits: Sequence[Hit], model, tokenizer, config: GenerateConfig | None = None,
                    *, judge=None) -> Answer:
    """One grounded generated answer (:func:`generate_answers`)."""
    return generate_answers([question], [hits], model, tokenizer, config, judge=judge)[0]
