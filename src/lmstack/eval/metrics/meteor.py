"""METEOR (Lavie & Agarwal 2007) with nltk's semantics: exact, then Porter-stem, then WordNet-synonym
matching of unigrams; F-mean with alpha=0.9, fragmentation penalty gamma * (chunks/matches)^beta.

Each stage aligns the still-unmatched words right to left: a hypothesis word takes the last unused
reference position holding the same word (stem; for synonyms the candidate whose last unused position is
rightmost); as in nltk, the synonym stage sees the stems of the words left over. Inputs are strings; they are split into tokens by ``tokenize`` (``whitespace`` default, or
``regex``: words and punctuation marks), then lower-cased, as nltk's ``meteor_score`` expects
pre-tokenised text. With several references the best score counts. WordNet comes from
:mod:`lmstack.eval.metrics.wordnet` (offline, see there for the one-line setup).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from functools import lru_cache

from lmstack.errors import ConfigError
from lmstack.eval.metrics.base import MetricResult, empty_failures, mean, register
from lmstack.eval.metrics.ngram import _porter

_REGEX_TOKENS = re.compile(r"\w+|[^\w\s]")

Pair = tuple[int, str]


def meteor_tokenize(text: str, tokenize: str = "whitespace") -> list[str]:
    if tokenize == "whitespace":
        return text.split()
    if tokenize == "regex":
        return _REGEX_TOKENS.findall(text)
    raise ConfigError(f"meteor option 'tokenize': expected 'whitespace' or 'regex', got {tokenize!r}")


def _align(hyp: list[Pair], ref: list[Pair], key: Callable[[str], str]) -> tuple[list[tuple[int, int]], list[Pair], list[Pair]]:
    # as nltk does, the words left unmatched are passed on in their keyed form (stems after the stem stage)
    hyp = [(i, key(w)) for i, w in hyp]
    ref = [(j, key(w)) for j, w in ref]
    positions: dict[str, list[int]] = defaultdict(list)
    for j, (_, w) in enumerate(ref):
        positions[w].append(j)
    matches, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        pos = positions.get(hyp[i][1])
        if pos:
            j = pos.pop()
            used_h.add(i)
            used_r.add(j)
            matches.append((hyp[i][0], ref[j][0]))
    return (matches, [p for i, p in enumerate(hyp) if i not in used_h],
            [p for j, p in enumerate(ref) if j not in used_r])


def _synonym_align(hyp: list[Pair], ref: list[Pair], synonyms: Callable[[str], frozenset[str]]):
    positions: dict[str, list[int]] = defaultdict(list)
    for j, (_, w) in enumerate(ref):
        positions[w].append(j)
    matches, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        best_j, best_word = -1, None
        for syn in synonyms(hyp[i][1]) | {hyp[i][1]}:
            pos = positions.get(syn)
            if pos and pos[-1] > best_j:
                best_j, best_word = pos[-1], syn
        if best_word is not None:
            positions[best_word].pop()
            used_h.add(i)
            used_r.add(best_j)
            matches.append((hyp[i][0], ref[best_j][0]))
    return (matches, [p for i, p in enumerate(hyp) if i not in used_h],
            [p for j, p in enumerate(ref) if j not in used_r])


@lru_cache(maxsize=1)
def _synonyms() -> Callable[[str], frozenset[str]]:
    from lmstack.eval.metrics.wordnet import load_wordnet

    wn = load_wordnet()

    @lru_cache(maxsize=200_000)
    def synonyms(word: str) -> frozenset[str]:
        # single-word lemma names of every synset of the word (multi-word lemmas contain "_")
        return frozenset(lemma.name() for s in wn.synsets(word) for lemma in s.lemmas() if "_" not in lemma.name())
    return synonyms


def _chunks(matches: list[tuple[int, int]]) -> int:
    chunks = 1
    for (h0, r0), (h1, r1) in zip(matches, matches[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def meteor_single(hyp_tokens: list[str], ref_tokens: list[str], alpha: float = 0.9, beta: float = 3.0,
                  gamma: float = 0.5, stages: tuple[str, ...] = ("exact", "stem", "synonym")) -> float:
    """METEOR of one tokenised hypothesis against one tokenised reference."""
    hyp = list(enumerate(w.lower() for w in hyp_tokens))
    ref = list(enumerate(w.lower() for w in ref_tokens))
    if not hyp or not ref:
        return 0.0
    matches: list[tuple[int, int]] = []
    rest_h, rest_r = hyp, ref
    for stage in stages:
        if stage == "exact":
            m, rest_h, rest_r = _align(rest_h, rest_r, lambda w: w)
        elif stage == "stem":
            m, rest_h, rest_r = _align(rest_h, rest_r, _porter())
        elif stage == "synonym":
            m, rest_h, rest_r = _synonym_align(rest_h, rest_r, _synonyms())
        else:
            raise ConfigError(f"meteor option 'stages': unknown stage {stage!r}; use exact, stem, synonym")
        matches += m
    if not matches:
        return 0.0
    matches.sort(key=lambda pair: pair[0])
    precision, recall = len(matches) / len(hyp), len(matches) / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    penalty = gamma * (_chunks(matches) / len(matches)) ** beta
    return (1 - penalty) * fmean


@register("meteor")
def meteor(predictions: list[str], references: list[list[str]], sources=None, *, tokenize: str = "whitespace",
           alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5,
           stages: tuple[str, ...] | list[str] = ("exact", "stem", "synonym"), on_empty: str = "record") -> MetricResult:
    """METEOR (nltk semantics, 0-1): exact + stem + WordNet synonym matching; corpus score = mean."""
    failures = empty_failures(predictions, on_empty)
    stages = tuple(stages)
    per_item = []
    for pred, refs in zip(predictions, references):
        h = meteor_tokenize(pred, tokenize)
        per_item.append(max(meteor_single(h, meteor_tokenize(r, tokenize), alpha, beta, gamma, stages)
                            for r in refs))
    return MetricResult("meteor", mean(per_item), per_item,
                        {"tokenize": tokenize, "alpha": alpha, "beta": beta, "gamma": gamma, "stages": list(stages)},
                        failures)
