"""SelfCheckGPT (Manakul et al. 2023): a fact the model knows comes back when it is sampled again; a
hallucination does not. Sample ``n`` more answers to the same prompt, then score each sentence of the
main answer by its **inconsistency** with the samples (0 = supported, 1 = contradicted):

- ``bertscore``: 1 - mean over samples of the best BERTScore F1 between the sentence and the sample's
  sentences;
- ``ngram``: a unigram model (add-one smoothing) fit on the samples and the answer; the sentence's
  average and maximum negative log-probability (higher = less supported; not bounded to 0-1);
- ``prompt``: an LLM is asked whether the sample supports the sentence; Yes = 0, No = 1, anything
  else = 0.5 (the paper's rule), averaged over samples.

The passage score is the mean over its sentences.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmstack.errors import ConfigError, DataError
from lmstack.eval.judges.base import JudgeResult
from lmstack.eval.llm import LLM

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")

PROMPT = """Context: {sample}

Sentence: {sentence}

Is the sentence supported by the context above? Answer Yes or No.

Answer:"""


def split_sentences(text: str) -> list[str]:
    """Sentences split after . ! ? followed by whitespace and a capital/digit/quote (no punkt model needed)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _ngram_scores(sentences: list[str], samples: Sequence[str], answer: str) -> list[dict[str, float]]:
    tok = lambda t: re.findall(r"\w+", t.lower())  # noqa: E731
    counts = Counter(w for text in [answer, *samples] for w in tok(text))
    total, vocab = sum(counts.values()), len(counts)
    out = []
    for s in sentences:
        nlls = [-math.log((counts[w] + 1) / (total + vocab)) for w in tok(s)]
        out.append({"avg_neg_logprob": sum(nlls) / len(nlls) if nlls else 0.0, "max_neg_logprob": max(nlls, default=0.0)})
    return out


def _bertscore_scores(sentences: list[str], samples: Sequence[str], **options: Any) -> list[float]:
    from lmstack.eval.metrics.bertscore import bertscore

    sample_sents = [split_sentences(s) or [s] for s in samples]
    best = [[0.0] * len(samples) for _ in sentences]
    for j, sents in enumerate(sample_sents):
        preds = [s for s in sentences for _ in sents]
        refs = [[r] for _ in sentences for r in sents]
        f = bertscore(preds, refs, mask_padding=True, **options).per_item
        for i in range(len(sentences)):
            best[i][j] = max(f[i * len(sents):(i + 1) * len(sents)])
    return [1.0 - sum(row) / len(row) for row in best]


def _prompt_scores(llm: LLM, sentences: list[str], samples: Sequence[str]) -> tuple[list[float], list[list[str]]]:
    prompts = [PROMPT.format(sample=smp, sentence=s) for s in sentences for smp in samples]
    replies = [r[0].text for r in llm.complete(prompts, max_tokens=3, temperature=0.0)]
    scores, raw = [], []
    for i in range(len(sentences)):
        row = replies[i * len(samples):(i + 1) * len(samples)]
        values = []
        for reply in row:
            word = (re.findall(r"[a-z]+", reply.lower()) or [""])[0]
            values.append(0.0 if word == "yes" else 1.0 if word == "no" else 0.5)
        scores.append(sum(values) / len(values))
        raw.append(row)
    return scores, raw


def selfcheck(answers: Sequence[str], samples: Sequence[Sequence[str]], method: str = "bertscore",
              llm: LLM | None = None, **options: Any) -> JudgeResult:
    """Per-answer inconsistency (mean over sentences) with sentence scores in ``details``.

    ``samples[i]``: the extra sampled answers for ``answers[i]`` (use :func:`sample_answers` to draw them).
    ``options`` go to BERTScore (``model``, ``tokenizer``, ``num_layers``).
    """
    if len(answers) != len(samples):
        raise DataError(f"SelfCheckGPT: {len(answers)} answers but {len(samples)} sample lists")
    if method not in ("bertscore", "ngram", "prompt"):
        raise ConfigError(f"SelfCheckGPT method must be bertscore, ngram or prompt, got {method!r}")
    if method == "prompt" and llm is None:
        raise ConfigError("SelfCheckGPT method 'prompt' needs an LLM")
    scores: list[float | None] = []
    details, failures = [], []
    for i, (answer, smp) in enumerate(zip(answers, samples)):
        sentences = split_sentences(answer)
        if not sentences or not smp:
            scores.append(None)
            details.append({})
            failures.append({"index": i, "reason": "empty answer" if not sentences else "no samples"})
            continue
        if method == "ngram":
            per = _ngram_scores(sentences, smp, answer)
            sent_scores = [d["avg_neg_logprob"] for d in per]
            details.append({"sentences": sentences, "sentence_scores": sent_scores, "ngram": per})
        elif method == "bertscore":
            sent_scores = _bertscore_scores(sentences, smp, **options)
            details.append({"sentences": sentences, "sentence_scores": sent_scores})
        else:
            sent_scores, raw = _prompt_scores(llm, sentences, smp)  # type: ignore[arg-type]
            details.append({"sentences": sentences, "sentence_scores": sent_scores, "replies": raw})
        scores.append(sum(sent_scores) / len(sent_scores))
    return JudgeResult(f"selfcheck:{method}", scores, details, failures)


def sample_answers(llm: LLM, prompts: Sequence[str], n: int = 5, temperature: float = 1.0, max_tokens: int = 256,
                   seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """The main (greedy) answer and ``n`` sampled answers per prompt."""
    main = [r[0].text for r in llm.complete(prompts, max_tokens=max_tokens, temperature=0.0)]
    sampled = [[c.text for c in r] for r in llm.complete(prompts, max_tokens=max_tokens, temperature=temperature,
                                                          n=n, seed=seed)]
    return main, sampled
