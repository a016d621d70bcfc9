"""SQuAD v1.1 as a retrieval benchmark: paragraphs as documents, questions with their paragraph as relevant,
and the one article split that reranker training and ``bench/rag.py`` share.

    docs, questions = load_squad("../shared/data/rag/squad_dev-v1.1.json")
    train_titles, eval_titles = split_articles({d.title for d in docs}, eval_fraction=0.5, seed=0)

Each paragraph is a :class:`~lmstack.rag.documents.Document` with id ``"<article>-<paragraph>"`` (positions in
the file), source ``squad:<id>`` and the article title as title; each question's relevant document is its
own paragraph. :func:`article_of` maps a question to its article through that id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmstack.errors import ConfigError, DataError
from lmstack.rag.documents import Document
from lmstack.rag.retrieve import Question


def load_squad(path: str | os.PathLike) -> tuple[list[Document], list[Question]]:
    """(paragraph documents, questions) of a SQuAD v1.1 JSON file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such SQuAD file (SQuAD v1.1 JSON, e.g. ../shared/data/rag/squad_dev-v1.1.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a SQuAD v1.1 file ({type(e).__name__}: {e})") from None
    docs, questions = [], []
    for a, article in enumerate(data):
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"{a}-{p}"
            docs.append(Document(doc_id, para["context"], f"squad:{doc_id}", article["title"]))
            questions += [Question(qa["question"], [doc_id]) for qa in para["qas"]]
    return docs, questions


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


def article_of(docs: Sequence[Document]) -> dict[str, str]:
    """Document id -> article title."""
    return {d.id: d.title for d in docs}


def questions_in(questions: Sequence[Question], docs: Sequence[Document], titles: Iterable[str]) -> list[Question]:
    """The questions whose relevant paragraph belongs to one of ``titles`` (file order kept)."""
    keep, title = set(titles), article_of(docs)
    return [q for q in questions if title.get(q.relevant[0]) in keep]
