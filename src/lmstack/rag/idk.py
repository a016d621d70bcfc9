"""Training a model to say "I don't know": SFT and DPO data from SQuAD, a chat-ready tiny base, and the figures.

Contexts are short so that a tiny model's window holds them (stories260K: 512 tokens of a 512-piece vocabulary,
about 1.7 characters a token on SQuAD text): a context is ``n_context`` single *sentences*, numbered as
:func:`lmstack.rag.answer.render_prompt` numbers sources, never whole paragraphs. The sentences come from a BM25
index (the layer's :class:`~lmstack.rag.index.BM25Index`) over the sentences of the same articles' paragraphs
(:func:`lmstack.rag.chunk.sentence_spans`; sentences longer than ``max_sentence_chars`` are left out).

For every question whose gold sentence (the sentence of its paragraph holding the first gold answer's offset)
is short enough, two examples:

- **answerable**: the gold sentence plus the ``n_context - 1`` best-ranked sentences of *other* paragraphs, the
  gold one put at a seeded random position ``g``; target ``"<first gold answer> [g]"``;
- **unanswerable**: the gold paragraph removed: the ``n_context`` best-ranked sentences of other paragraphs;
  target ``"I don't know"``.

Sentences of other paragraphs that contain a gold answer string (normalised as SQuAD does) are skipped, so an
unanswerable context never holds the answer either. SFT rows are ``{"messages": [user: prompt, assistant:
target]}``; DPO rows ``{"prompt", "chosen", "rejected"}`` with chosen = the target and rejected = the opposite
behaviour: "I don't know" for an answerable question, the gold answer cited to [1] (an answer the sources do
not hold) for an unanswerable one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.rag.answer import IDK, Answer, is_abstention, render_prompt, strip_citations
from lmstack.rag.index import BM25Index, Hit
from lmstack.rag.squad import SquadQuestion, squad_paragraphs


@dataclass
class IdkConfig:
    n_context: int = 2              # numbered sources per prompt (the gold sentence + 1 distractor)
    max_sentence_chars: int = 150   # longer sentences are not used (neither as gold nor as distractor)
    max_answer_chars: int = 60
    max_questions: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_context < 1:
            raise ConfigError(f"idk n_context must be >= 1, got {self.n_context}")
        if self.max_sentence_chars < 20:
            raise ConfigError(f"idk max_sentence_chars must be >= 20, got {self.max_sentence_chars}")


@dataclass
class IdkExample:
    question: SquadQuestion
    answerable: bool
    hits: list[Hit]
    gold: int | None = None         # answerable: the 1-based number of the gold sentence among ``hits``
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return render_prompt(self.question.question, self.hits)

    @property
    def target(self) -> str:
        return f"{self.question.answers[0]} [{self.gold}]" if self.answerable else IDK

    @property
    def opposite(self) -> str:
        return IDK if self.answerable else f"{self.question.answers[0]} [1]"


def _norm(text: str) -> str:
    from lmstack.eval.metrics.text import normalize_answer

    return f" {normalize_answer(text, ignore_articles=True)} "


def sentence_index(articles: Sequence[Mapping[str, Any]], max_chars: int) -> tuple[BM25Index, dict[str, list]]:
    """A BM25 index over the paragraphs' sentences (``<= max_chars``), and every sentence chunk by paragraph."""
    from lmstack.rag.chunk import make_chunks, sentence_spans

    docs, _ = squad_paragraphs(articles)
    by_doc = {d.id: make_chunks(d, sentence_spans(d.text)) for d in docs}
    for chunks in by_doc.values():
        for c in chunks:
            c.source = ""  # no "(source)" line in the prompt: it costs a tiny model's window and says nothing
    index = BM25Index()
    index.add([c for cs in by_doc.values() for c in cs if len(c.text) <= max_chars])
    return index, by_doc


def build_idk_examples(articles: Sequence[Mapping[str, Any]], config: IdkConfig | None = None) -> list[IdkExample]:
    """Answerable and unanswerable examples (two per usable question; see the module doc), seeded."""
    cfg = config or IdkConfig()
    rng = random.Random(cfg.seed)
    _, questions = squad_paragraphs(articles)
    index, by_doc = sentence_index(articles, cfg.max_sentence_chars)
    if cfg.max_questions is not None:
        questions = rng.sample(questions, min(cfg.max_questions, len(questions)))
    out: list[IdkExample] = []
    for q in questions:
        answer = q.answers[0]
        if len(answer) > cfg.max_answer_chars:
            continue
        gold = next((c for c in by_doc[q.doc_id] if c.start <= q.answer_start < c.end), None)
        if gold is None or len(gold.text) > cfg.max_sentence_chars or answer not in gold.text:
            continue
        golds = [_norm(a) for a in q.answers]
        others = [h for h in index.search(q.question, 4 * cfg.n_context + 10)
                  if h.chunk.doc_id != q.doc_id and not any(g in _norm(h.chunk.text) for g in golds)]
        if len(others) < cfg.n_context:
            continue
        gold_hit = next((h for h in index.search(q.question, len(index.chunks), {"doc_id": q.doc_id})
                         if h.chunk.id == gold.id), Hit(gold, 0.0))
        pos = rng.randrange(cfg.n_context)
        hits = others[:cfg.n_context - 1]
        hits.insert(pos, gold_hit)
        out.append(IdkExample(q, True, hits, pos + 1))
        out.append(IdkExample(q, False, others[:cfg.n_context]))
    return out


def sft_rows(examples: Sequence[IdkExample]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.target}],
             "id": e.question.id, "answerable": e.answerable} for e in examples]


def dpo_rows(examples: Sequence[IdkExample]) -> list[dict[str, Any]]:
    return [{"prompt": e.prompt, "chosen": e.target, "rejected": e.opposite, "id": e.question.id,
             "answerable": e.answerable} for e in examples]


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    from lmstack.runs import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def score_answers(examples: Sequence[IdkExample], answers: Sequence[Answer]) -> dict[str, float]:
    """Abstention precision/recall over all examples (``model_*``: counting only the model's own "I don't
    know", before verification) and SQuAD EM/F1 over the answerable ones (an abstention scores 0 there);
    ``answered_em``/``answered_f1``: over the answerable ones it answered."""
    from lmstack.rag.metrics import abstention_precision_recall, squad_exact_match, squad_f1

    if len(examples) != len(answers):
        raise ConfigError(f"score_answers: {len(examples)} examples but {len(answers)} answers")
    out = abstention_precision_recall([a.abstained for a in answers], [not e.answerable for e in examples])
    # the model's own "I don't know", before verification turns unsupported replies into abstentions
    said = abstention_precision_recall([is_abstention(a.generated) for a in answers],
                                       [not e.answerable for e in examples])
    out.update({f"model_{k}": v for k, v in said.items() if k in ("precision", "recall", "abstained",
                                                                   "abstain_rate_answerable")})
    em, f1, answered = [], [], []
    for e, a in zip(examples, answers):
        if not e.answerable:
            continue
        pred = "" if a.abstained else strip_citations(a.text)
        em.append(squad_exact_match(pred, e.question.answers) if pred else 0.0)
        f1.append(squad_f1(pred, e.question.answers))
        if not a.abstained:
            answered.append((em[-1], f1[-1]))
    out["em"] = sum(em) / len(em) if em else float("nan")
    out["f1"] = sum(f1) / len(f1) if f1 else float("nan")
    out["answered_em"] = sum(x for x, _ in answered) / len(answered) if answered else float("nan")
    out["answered_f1"] = sum(y for _, y in answered) / len(answered) if answered else float("nan")
    return out


CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def with_chat_tokens(base: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """A copy of a Hugging Face-tokenizer model folder with lmstack's chat tokens added, so that the
    fine-tuning and alignment layers (which render turns with :func:`lmstack.tokenizer.chat.render_chat`) can
    train it: the tokens are appended to ``tokenizer.json``'s ``added_tokens`` (ids from the vocabulary size
    on) and the embedding (and a tied head) gets one row per token, each the mean row plus seeded noise of a
    tenth of the rows' standard deviation. Written as an lmstack model folder (``model_config.json``)."""
    import dataclasses

    import torch

    from lmstack.infer.text import find_model_folder, load_model_folder
    from lmstack.model import build_model, save
    from lmstack.runs import atomic_write_json

    src = Path(base)
    folder = find_model_folder(src)
    tok_file = next((p / "tokenizer.json" for p in (folder, src) if (p / "tokenizer.json").is_file()), None)
    if tok_file is None:
        raise ConfigError(f"{src}: no tokenizer.json (with_chat_tokens extends a Hugging Face tokenizer)")
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    model = load_model_folder(folder, "cpu", torch.float32)
    have = {t["content"] for t in data.get("added_tokens") or []}
    vocab = model.config.vocab_size
    new = [t for t in CHAT_TOKENS if t not in have]
    for j, t in enumerate(new):
        data.setdefault("added_tokens", []).append({"id": vocab + j, "content": t, "single_word": False,
                                                    "lstrip": False, "rstrip": False, "normalized": False,
                                                    "special": True})
    grown = build_model(dataclasses.replace(model.config, vocab_size=vocab + len(new)))
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(state.items()):
        if tensor.dim() == 2 and tensor.shape[0] == vocab and grown.state_dict()[name].shape[0] == vocab + len(new):
            rows = tensor.mean(0, keepdim=True) + 0.1 * tensor.std() * torch.randn(len(new), tensor.shape[1],
                                                                                    generator=g)
            state[name] = torch.cat([tensor, rows])
    grown.load_state_dict(state)
    out_dir = Path(out)
    save(grown.eval(), out_dir)
    atomic_write_json(out_dir / "tokenizer.json", data)
    return out_dir
