"""SQuAD v1.1 for the RAG layer: the reader, the article split, paragraphs as documents, questions.

- :func:`read_squad` reads the official JSON (``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``).
- :func:`squad_article_split` splits *articles* (never paragraphs or questions) into train and eval by a hash
  of the title (:func:`lmstack.data.split.is_heldout`, the data layer's one held-out rule): the same title
  always falls on the same side, whatever the order or the other articles, so a model trained on the train
  articles (a reranker, the "I don't know" SFT/DPO data) never sees an eval article's text.
- :func:`squad_paragraphs` gives each paragraph as a :class:`~lmstack.rag.documents.Document` with id
  ``"<title>/<p>"`` (stable across splits) and every question as a :class:`SquadQuestion` (its gold answers,
  the first answer's character offset, its paragraph's id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lmstack.errors import ConfigError, DataError
from lmstack.rag.documents import Document

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


def _title(article: Any) -> str:
    if isinstance(article, str):
        return article
    if isinstance(article, Mapping):
        return str(article["title"])
    return str(article.title)


def squad_article_split(articles: Sequence[T], eval_fraction: float = 0.25, seed: int = 0
                        ) -> tuple[list[T], list[T]]:
    """``(train_articles, eval_articles)``: an article is eval when the hash of its title (with ``seed``)
    falls in the ``eval_fraction`` share (:func:`lmstack.data.split.is_heldout`); order is kept.

    ``articles``: article dicts (``{"title", ...}``), objects with a ``title``, or title strings.
    """
    from lmstack.data.split import is_heldout

    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"squad_article_split eval_fraction must be in (0, 1), got {eval_fraction}")
    train, held = [], []
    for a in articles:
        (held if is_heldout(_title(a), eval_fraction, seed) else train).append(a)
    return train, held


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
