"""SQuAD v1.1 for the RAG layer: the one reader, the one article split, paragraphs as documents, questions.

    articles = read_squad("../shared/data/rag/squad_dev-v1.1.json")
    train, held = squad_article_split(articles, eval_fraction=0.25)      # article dicts
    docs, questions = load_squad(path)                                    # retrieval benchmark form
    train_titles, eval_titles = split_articles({d.title for d in docs}, eval_fraction=0.5)

- :func:`read_squad` reads the official JSON (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``);
  everything else here starts from it.
- :func:`split_articles` is the one split: *articles* (never paragraphs or questions) ranked by the SHA-256 of
  ``"<seed>:<title>"``, the first ``round(eval_fraction * n)`` held out. Order-independent and exact in size,
  so a model trained on the train articles (the reranker, the "I don't know" SFT/DPO data) never sees an eval
  article's text. :func:`squad_article_split` applies it to article dicts (or anything with a title).
- :func:`load_squad`: paragraphs as Documents with id ``"<article>-<paragraph>"`` (positions in the file) and
  each question with its own paragraph as relevant (``bench/rag.py``, reranker training).
- :func:`squad_paragraphs`: paragraphs with id ``"<title>/<p>"`` and :class:`SquadQuestion` rows carrying the
  gold answers and offsets (the answer and "I don't know" paths, which need the answers).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lmstack.errors import ConfigError, DataError
from lmstack.rag.documents import Document
from lmstack.rag.retrieve import Question

T = TypeVar("T")


@dataclass
class SquadQuestion:
    id: str
    question: str
    answers: list[str]         # the gold answer texts (SQuAD dev has up to 3 per question, often repeated)
    answer_start: int          # character offset of the first answer in its paragraph
    doc_id: str                # "<title>/<p>"
    title: str


def read_squad(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The articles of a SQuAD v1.1 JSON file (a clear one-line error for a missing or malformed file)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such SQuAD file (SQuAD v1.1 dev is ../shared/data/rag/squad_dev-v1.1.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{p}: not SQuAD v1.1 JSON (expected {{\"data\": [articles]}})") from None
    if not isinstance(data, list) or not all(isinstance(a, dict) and "title" in a and "paragraphs" in a
                                             for a in data):
        raise DataError(f"{p}: every article needs 'title' and 'paragraphs'")
    return data


def split_articles(titles: Iterable[str], eval_fraction: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training titles, evaluation titles): a fixed, seeded, order-independent split by article.

    Titles are ranked by SHA-256 of ``"<seed>:<title>"``; the first ``round(eval_fraction * n)`` are held out
    for evaluation, the rest train. The same titles and seed always give the same split, whatever order
    they come in, and no article is on both sides (its paragraphs and questions go with it).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction: must be in (0, 1), got {eval_fraction}")
    unique = sorted(set(titles))
    if len(unique) < 2:
        raise DataError(f"split_articles: need at least 2 articles to split, got {len(unique)}")
    ranked = sorted(unique, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    n_eval = min(len(unique) - 1, max(1, round(eval_fraction * len(unique))))
    return sorted(ranked[n_eval:]), sorted(ranked[:n_eval])


def _title(article: Any) -> str:
    if isinstance(article, str):
        return article
    if isinstance(article, Mapping):
        return str(article["title"])
    return str(article.title)


def squad_article_split(articles: Sequence[T], eval_fraction: float = 0.25, seed: int = 0
                        ) -> tuple[list[T], list[T]]:
    """``(train_articles, eval_articles)`` by :func:`split_articles` of their titles; order is kept.

    ``articles``: article dicts (``{"title", ...}``), objects with a ``title``, or title strings.
    """
    _, held_titles = split_articles([_title(a) for a in articles], eval_fraction, seed)
    held = set(held_titles)
    return [a for a in articles if _title(a) not in held], [a for a in articles if _title(a) in held]


def load_squad(path: str | os.PathLike) -> tuple[list[Document], list[Question]]:
    """(paragraph documents, questions) of a SQuAD v1.1 JSON file, in file order."""
    docs, questions = [], []
    for a, article in enumerate(read_squad(path)):
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"{a}-{p}"
            docs.append(Document(doc_id, para["context"], f"squad:{doc_id}", article["title"]))
            questions += [Question(qa["question"], [doc_id]) for qa in para["qas"]]
    return docs, questions


def article_of(docs: Sequence[Document]) -> dict[str, str]:
    """Document id -> article title."""
    return {d.id: d.title for d in docs}


def questions_in(questions: Sequence[Question], docs: Sequence[Document], titles: Iterable[str]) -> list[Question]:
    """The questions whose relevant paragraph belongs to one of ``titles`` (file order kept)."""
    keep, title = set(titles), article_of(docs)
    return [q for q in questions if title.get(q.relevant[0]) in keep]


def squad_paragraphs(articles: Sequence[Mapping[str, Any]]) -> tuple[list[Document], list[SquadQuestion]]:
    """Every paragraph as a Document (id ``"<title>/<p>"``, source ``squad:<id>``) and every question."""
    docs, questions = [], []
    for article in articles:
        title = str(article["title"])
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"{title}/{p}"
            docs.append(Document(doc_id, para["context"], f"squad:{doc_id}", title))
            for qa in para["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                if not answers:
                    continue
                questions.append(SquadQuestion(str(qa["id"]), qa["question"], answers,
                                               int(qa["answers"][0]["answer_start"]), doc_id, title))
    return docs, questions
