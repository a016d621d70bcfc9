"""Judged RAG metrics (RAGAS) and the support check, through the evaluation layer's judges.

Every judgement is one yes/no question to an :class:`lmstack.eval.llm.LLM` (a local lmstack model or any
OpenAI-compatible endpoint), asked as a one-node decision graph of :mod:`lmstack.eval.judges.dag` (its prompt,
its option parsing, its batching): ``yes`` = 1, ``no`` = 0, a reply naming neither is a recorded failure
(``None``), never a zero. Metric results are :class:`lmstack.eval.judges.JudgeResult` s (per-item scores,
failures, mean over the scored items).

Definitions follow RAGAS (Es et al. 2023, "RAGAS: Automated Evaluation of Retrieval Augmented Generation",
arXiv:2309.15217, and the ragas documentation's metric pages):

- **faithfulness** = |answer statements supported by the retrieved contexts| / |answer statements|.
  RAGAS has an LLM break the answer into statements; here the statements are the answer's sentences
  (citations removed; an "I don't know" sentence is no statement), so no decomposition call is needed.
  An answer with no statement is a failure (no score).
- **context precision@K** (with a reference answer) = sum_{k=1..K} precision@k * v_k / |relevant in top K|,
  v_k = 1 when the judge says the context at rank k is useful for arriving at the reference answer,
  precision@k = (sum_{i<=k} v_i) / k; 0 when no context is useful.
- **context recall** = |reference sentences attributable to the retrieved contexts| / |reference sentences|.
- **answer relevancy** = mean over N questions generated from the answer alone of
  cos(embed(generated question), embed(question)); 0 for a noncommittal answer ("I don't know"), as RAGAS
  sets it. The generator is the same LLM; ``embed`` is any text -> vectors function (the layer's
  :class:`~lmstack.rag.embed.Embedder` ``.embed_queries``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmstack.errors import DataError
from lmstack.eval.judges.base import JudgeResult

SUPPORT_QUESTION = "Is every claim in the output stated in, or directly implied by, the input?"
USEFUL_QUESTION = ("The input is a retrieved passage; the output is a question and its reference answer. Is the "
                   "passage useful for arriving at that answer?")
QUESTION_PROMPT = "Write one question that the following answer answers.\n\nAnswer: {answer}\n\nQuestion:"


def yes_no(llm: Any, question: str, items: Sequence[tuple[str, str]]) -> list[float | None]:
    """The judge's verdict (1 yes, 0 no, None unparsed) on each ``(input, output)`` pair, one batch."""
    from lmstack.eval.judges.dag import DAG

    if not items:
        return []
    graph = DAG.from_dict({"root": "q", "nodes": {"q": {"judge": question, "options": {"yes": 1, "no": 0}}}})
    return graph.evaluate(llm, [{"source": s, "output": o} for s, o in items]).scores


def supported(llm: Any, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
    """Does the source (first) support the claim (second)? ``None`` where the reply names neither yes nor no."""
    return [None if v is None else v == 1.0 for v in yes_no(llm, SUPPORT_QUESTION, pairs)]


def statements(text: str) -> list[str]:
    """The sentences of an answer, citations removed, "I don't know" sentences left out."""
    from lmstack.rag.answer import is_abstention, split_cited
    from lmstack.rag.chunk import sentence_spans

    out = []
    for sentence, _ in split_cited(text):
        for s, e in sentence_spans(sentence):
            piece = sentence[s:e].strip()
            if piece and not is_abstention(piece):
                out.append(piece)
    return out


def _check_lengths(name: str, **lists: Sequence) -> int:
    sizes = {k: len(v) for k, v in lists.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{name}: lists of different lengths ({', '.join(f'{k}={n}' for k, n in sizes.items())})")
    return next(iter(sizes.values()))


def _ratio_per_item(name: str, groups: list[list[tuple[str, str]]], llm: Any, question: str,
                    empty_reason: str) -> JudgeResult:
    flat = [pair for g in groups for pair in g]
    verdicts = yes_no(llm, question, flat)
    scores: list[float | None] = []
    details, failures = [], []
    pos = 0
    for i, g in enumerate(groups):
        v = verdicts[pos:pos + len(g)]
        pos += len(g)
        details.append({"claims": [o for _, o in g], "verdicts": v})
        ok = [x for x in v if x is not None]
        if not g:
            failures.append({"index": i, "reason": empty_reason})
            scores.append(None)
        elif len(ok) < len(v):
            failures.append({"index": i, "reason": f"{len(v) - len(ok)} judge replies named neither yes nor no"})
            scores.append(None)
        else:
            scores.append(sum(ok) / len(ok))
    return JudgeResult(name, scores, details, failures)


def faithfulness(answers: Sequence[str], contexts: Sequence[Sequence[str]], llm: Any) -> JudgeResult:
    """RAGAS faithfulness per answer: supported statements / statements (see the module doc)."""
    _check_lengths("faithfulness", answers=answers, contexts=contexts)
    groups = [[("\n\n".join(ctx), s) for s in statements(a)] for a, ctx in zip(answers, contexts)]
    return _ratio_per_item("faithfulness", groups, llm, SUPPORT_QUESTION, "the answer has no statement")


def context_recall(contexts: Sequence[Sequence[str]], references: Sequence[str], llm: Any) -> JudgeResult:
    """RAGAS context recall per question: reference sentences attributable to the contexts / all of them."""
    _check_lengths("context_recall", contexts=contexts, references=references)
    groups = [[("\n\n".join(ctx), s) for s in statements(ref)] for ctx, ref in zip(contexts, references)]
    return _ratio_per_item("context_recall", groups, llm, SUPPORT_QUESTION, "the reference has no sentence")


def context_precision(questions: Sequence[str], contexts: Sequence[Sequence[str]], references: Sequence[str],
                      llm: Any) -> JudgeResult:
    """RAGAS context precision@K per question, K = its number of contexts (see the module doc)."""
    _check_lengths("context_precision", questions=questions, contexts=contexts, references=references)
    items = [(c, f"Question: {q}\nAnswer: {r}") for q, ctx, r in zip(questions, contexts, references) for c in ctx]
    verdicts = yes_no(llm, USEFUL_QUESTION, items)
    scores: list[float | None] = []
    details, failures = [], []
    pos = 0
    for i, ctx in enumerate(contexts):
        v = verdicts[pos:pos + len(ctx)]
        pos += len(ctx)
        details.append({"useful": v})
        if not ctx or any(x is None for x in v):
            failures.append({"index": i, "reason": "no context" if not ctx else "a judge reply named neither yes nor no"})
            scores.append(None)
            continue
        hits, total = 0.0, 0.0
        for k, useful in enumerate(v, 1):
            hits += useful
            total += (hits / k) * useful
        scores.append(total / hits if hits else 0.0)
    return JudgeResult("context_precision", scores, details, failures)


def answer_relevancy(questions: Sequence[str], answers: Sequence[str], llm: Any,
                     embed: Callable[[list[str]], np.ndarray], n: int = 3, seed: int = 0) -> JudgeResult:
    """RAGAS answer relevancy per answer: mean cosine of ``n`` questions generated from the answer to the
    question (0 for "I don't know"); ``n`` > 1 samples at temperature 1 with ``seed``, ``n`` = 1 is greedy."""
    from lmstack.rag.answer import is_abstention, strip_citations

    _check_lengths("answer_relevancy", questions=questions, answers=answers)
    scores: list[float | None] = [None] * len(answers)
    details: list[dict[str, Any]] = [{} for _ in answers]
    ask = []
    for i, a in enumerate(answers):
        if is_abstention(a) or not strip_citations(a):
            scores[i], details[i] = 0.0, {"noncommittal": True}
        else:
            ask.append(i)
    prompts = [QUESTION_PROMPT.format(answer=strip_citations(answers[i])) for i in ask]
    replies = llm.complete(prompts, max_tokens=64, temperature=1.0 if n > 1 else 0.0, n=n, seed=seed) if ask else []
    failures = []
    for i, row in zip(ask, replies):
        generated = [(c.text.strip().splitlines() or [""])[0].strip() for c in row]
        generated = [g for g in generated if g]
        if not generated:
            failures.append({"index": i, "reason": "the LLM generated no question"})
            continue
        vecs = np.asarray(embed([questions[i], *generated]), dtype=np.float64)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        cos = vecs[1:] @ vecs[0]
        scores[i] = float(cos.mean())
        details[i] = {"generated": generated, "cosines": cos.tolist()}
    return JudgeResult("answer_relevancy", scores, details, failures)
