"""Evaluation items made from held-out text alone, for corpora that come with no labelled benchmark.

- :func:`split_at_space`: an opening and the text that follows it, both cut on spaces;
- :func:`generation_pairs`: (prompt, reference continuation) pairs for generation metrics;
- :func:`cloze_items`: HellaSwag-style multiple choice, the true continuation of an opening against three
  continuations taken from other documents at the same offset.

Cuts fall on spaces because the multiple-choice scorer joins query and choice with one space, as
lm-evaluation-harness does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def split_at_space(text: str, at: int, length: int) -> tuple[str, str] | None:
    """Cut ``text`` at the first space at or after ``at``: (opening, the next ``length`` chars cut at a space)."""
    k = text.find(" ", at)
    if k < 0:
        return None
    rest = text[k + 1: k + 1 + length]
    end = rest.rfind(" ")
    rest = rest[:end] if end > 0 else rest
    return (text[:k], rest.strip()) if rest.strip() else None


def generation_pairs(texts: Sequence[str], n: int, prompt_chars: int, continuation_chars: int
                     ) -> list[tuple[str, str]]:
    """Up to ``n`` (opening, true continuation) pairs, in the order of ``texts``."""
    return [p for t in texts if (p := split_at_space(t, prompt_chars, continuation_chars))][:n]


def cloze_items(texts: Sequence[str], n: int, prompt_chars: int, continuation_chars: int, seed: int) -> list[dict]:
    """Up to ``n`` items ``{"query", "choices", "gold"}``: the true continuation among three distractors from
    other documents, at a seeded random position."""
    pairs = [p for t in texts if (p := split_at_space(t, prompt_chars, continuation_chars))]
    rng = random.Random(seed)
    items = []
    for i, (query, true) in enumerate(pairs[:n]):
        others = [j for j in range(len(pairs)) if j != i and pairs[j][1] != true]
        if len(others) < 3:
            break
        wrong = [pairs[j][1] for j in rng.sample(others, 3)]
        gold = rng.randrange(4)
        items.append({"query": query, "choices": wrong[:gold] + [true] + wrong[gold:], "gold": gold})
    return items
