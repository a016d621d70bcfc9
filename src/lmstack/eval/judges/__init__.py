"""LLM judges over the :class:`lmstack.eval.llm.LLM` interface.

- :mod:`~lmstack.eval.judges.geval`: G-Eval (rubric -> evaluation steps -> form-filling score, weighted
  by the score tokens' probabilities);
- :mod:`~lmstack.eval.judges.dag`: decision graphs of single-criterion judges and rules;
- :mod:`~lmstack.eval.judges.selfcheck`: SelfCheckGPT sentence consistency against sampled answers;
- :mod:`~lmstack.eval.judges.bias`: pointwise and pairwise judging with bias controls (position swap,
  length bias, sample variance, prompt sensitivity).

Every judge returns a :class:`JudgeResult`; a reply that does not parse is a recorded per-item failure
(score ``None``), never a zero.
"""

from __future__ import annotations

from lmstack.eval.judges.base import JudgeResult, parse_score

__all__ = ["JudgeResult", "parse_score"]
