"""Meta-evaluation: how well does a metric agree with human ratings?

Pearson (linear), Spearman (Pearson of average ranks) and Kendall's tau-b (pairs concordant minus
discordant, ties corrected), at two levels, the way SummEval-style tables are made:

- **summary level** (G-Eval's protocol): for each source document, correlate metric and human scores
  across the systems' outputs for that document, then average over documents;
- **system level**: average each system's scores over documents, then correlate across systems.
- ``level="flat"`` correlates all items at once.

:func:`correlate_table` computes every metric x every human dimension in one call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, DataError


def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and xs[end + 1] == xs[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc ** 2).sum() * (yc ** 2).sum())
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rank(np.asarray(x, np.float64)), rank(np.asarray(y, np.float64)))


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (C - D) / sqrt((n0 - tx) (n0 - ty)) over all pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    s = float((dx * dy).sum())
    denom = np.sqrt(float((dx != 0).sum()) * float((dy != 0).sum()))
    return s / denom if denom > 0 else float("nan")


CORRELATIONS = {"pearson": pearson, "spearman": spearman, "kendall": kendall}


def correlate(metric: Sequence[float], human: Sequence[float], groups: Sequence[Any] | None = None,
              systems: Sequence[Any] | None = None, level: str = "summary") -> dict[str, float]:
    """Pearson, Spearman and Kendall of ``metric`` vs ``human`` at ``level`` (summary, system or flat).

    ``groups``: the source document of each item (summary level); ``systems``: the system of each item
    (system level). Items with a missing (NaN) metric value are dropped and counted.
    """
    m, h = np.asarray(metric, np.float64), np.asarray(human, np.float64)
    if len(m) != len(h):
        raise DataError(f"correlate: {len(m)} metric scores but {len(h)} human scores")
    keep = np.isfinite(m) & np.isfinite(h)
    out: dict[str, float] = {"n": int(keep.sum()), "dropped": int((~keep).sum())}
    if level == "flat":
        for name, fn in CORRELATIONS.items():
            out[name] = fn(m[keep], h[keep])
        return out
    key = {"summary": groups, "system": systems}.get(level, "bad")
    if isinstance(key, str):
        raise ConfigError(f"correlate: level must be summary, system or flat, got {level!r}")
    if key is None:
        raise ConfigError(f"correlate level {level!r} needs {'groups' if level == 'summary' else 'systems'}=")
    if len(key) != len(m):
        raise DataError(f"correlate: {len(m)} scores but {len(key)} group labels")
    buckets: dict[Any, list[int]] = defaultdict(list)
    for idx, g in enumerate(key):
        if keep[idx]:
            buckets[g].append(idx)
    if level == "system":
        ms = [m[v].mean() for v in buckets.values()]
        hs = [h[v].mean() for v in buckets.values()]
        for name, fn in CORRELATIONS.items():
            out[name] = fn(ms, hs)
        out["units"] = len(buckets)
        return out
    for name, fn in CORRELATIONS.items():
        vals = [fn(m[v], h[v]) for v in buckets.values() if len(v) > 1]
        vals = [v for v in vals if np.isfinite(v)]  # a document whose scores are all tied has no correlation
        out[name] = float(np.mean(vals)) if vals else float("nan")
    out["units"] = len(buckets)
    return out


def correlate_table(metrics: dict[str, Sequence[float]], human: dict[str, Sequence[float]],
                    groups: Sequence[Any] | None = None, systems: Sequence[Any] | None = None,
                    level: str = "summary") -> dict[str, dict[str, dict[str, float]]]:
    """``{metric: {dimension: {pearson, spearman, kendall, n, ...}}}``."""
    return {name: {dim: correlate(values, h, groups, systems, level) for dim, h in human.items()}
            for name, values in metrics.items()}


def table_markdown(table: dict[str, dict[str, dict[str, float]]], stats: Sequence[str] = ("spearman", "kendall"),
                   reference: dict[str, dict[str, tuple[float, float]]] | None = None) -> str:
    """A markdown table, one row per metric, ``rho / tau`` per dimension (+ reference figures if given)."""
    dims = list(next(iter(table.values())).keys()) if table else []
    head = "| metric | " + " | ".join(f"{d} ({'/'.join(s[0] for s in stats)})" for d in dims) + " |"
    lines = [head, "|" + " --- |" * (len(dims) + 1)]
    for name, row in table.items():
        cells = []
        for d in dims:
            cell = " / ".join(f"{row[d][s]:.3f}" for s in stats)
            if reference and name in reference and d in reference[name]:
                cell += " (paper " + " / ".join(f"{v:.3f}" for v in reference[name][d]) + ")"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
