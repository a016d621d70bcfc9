"""What judges return and how replies are parsed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class JudgeResult:
    """Per-item scores (``None`` where the judge failed), per-item details, failures and a summary."""

    name: str
    scores: list[float | None]
    details: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Mean over the items that were scored (NaN when none was)."""
        ok = [s for s in self.scores if s is not None and math.isfinite(s)]
        return float(np.mean(ok)) if ok else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "scores": self.scores, "details": self.details,
                "failures": self.failures, "summary": self.summary}


def parse_score(text: str, lo: float, hi: float) -> float | None:
    """The first number in ``text`` if it lies in [lo, hi], else None ("4", "Score: 4/5", "4.5")."""
    m = _NUMBER.search(text or "")
    if not m:
        return None
    value = float(m.group())
    return value if lo <= value <= hi else None


def score_token(token: str, lo: int, hi: int) -> int | None:
    """An integer score written as one token (surrounding spaces allowed), else None."""
    t = token.strip()
    if t.isdigit() and lo <= int(t) <= hi:
        return int(t)
    return None
