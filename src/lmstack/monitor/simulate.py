"""A simulated week of traffic: a daily cycle, then (optionally) a shift -- for the bench, the tests, the speedrun.

Every hour has its volume (Poisson, peak at 14:00 UTC, 0.4x at night), its topic mix (work topics by day,
leisure in the evening) and its lengths (longer questions in working hours): a stable stream that a
previous-window reference alarms on and a same-hour reference does not. From ``shift_day`` (0-based) on:

- ``topic_shift``: that share of requests moves to a topic absent from the reference (new vocabulary too);
- ``length_scale``: input lengths are multiplied by it;
- ``refusal_rate``: the model refuses that share of requests ("I'm sorry, but I can't help with that.").

Rows carry the log store's Interaction fields (``id``, ``time``, ``model``, ``user``, ``input``, ``output``,
``latency_s``, token counts, ``finish_reason``) and, on ~15% of them, a ``thumb`` (+1/-1; refusals get fewer ups).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

START = 1767571200.0  # 2026-01-05 00:00 UTC, a Monday

TOPICS = {
    "coding": ("python function error list loop class compile variable array debug test module import string "
               "parse json server api query index"),
    "finance": ("budget invoice tax loan interest rate account salary pension mortgage savings expense "
                "profit revenue quarter forecast"),
    "cooking": ("recipe oven pasta sauce garlic onion bake flour butter salad soup roast spice dinner "
                "vegetable chicken"),
    "travel": ("flight hotel train museum beach visa luggage ticket city tour itinerary airport passport "
               "booking weekend"),
    "sports": ("match team score league goal training coach season player race marathon tennis football "
               "final stadium"),
    "health": ("sleep exercise diet vitamin headache doctor symptom stretch posture water calories protein "
               "stress walk"),
}
NEW_TOPIC = ("quantum qubit entangle superposition decoherence hamiltonian photon lattice spinor annealing "
             "topological fermion boson wavefunction")
FILLER = ["how", "do", "i", "what", "is", "the", "a", "can", "you", "explain", "best", "way", "to", "for", "my",
          "with", "in", "and", "of", "about"]
ANSWER = ["here", "is", "one", "way", "to", "do", "it", "first", "then", "next", "you", "can", "also", "try", "this",
          "so", "that", "it", "works", "well"]
POSITIVE = ["great", "glad", "happy", "helpful"]
REFUSAL = "I'm sorry, but I can't help with that."

# topic -> (base weight, amplitude, peak hour): work topics peak mid-day, leisure in the evening
_MIX = {"coding": (1.0, 0.8, 13), "finance": (0.7, 0.8, 11), "cooking": (0.8, 0.9, 19),
        "travel": (0.7, 0.6, 20), "sports": (0.6, 0.7, 21), "health": (0.6, 0.3, 8)}


@dataclass
class SimConfig:
    days: int = 7
    rows_per_hour: float = 120.0
    start: float = START
    shift_day: int | None = 5
    topic_shift: float = 0.0
    length_scale: float = 1.0
    refusal_rate: float = 0.0
    thumb_rate: float = 0.15
    model: str = "sim-model"
    seed: int = 0


def _hour_weights(hour: float) -> dict[str, float]:
    return {t: b * (1 + a * math.cos(2 * math.pi * (hour - p) / 24)) for t, (b, a, p) in _MIX.items()}


def simulate_traffic(config: SimConfig | None = None, **overrides: Any) -> list[dict[str, Any]]:
    cfg = config or SimConfig()
    if overrides:
        cfg = SimConfig(**{**cfg.__dict__, **overrides})
    rng = random.Random(cfg.seed)
    vocab = {t: v.split() for t, v in TOPICS.items()}
    new_vocab = NEW_TOPIC.split()
    rows: list[dict[str, Any]] = []
    n_id = 0
    for h in range(cfg.days * 24):
        hour = h % 24
        shifted = cfg.shift_day is not None and h >= cfg.shift_day * 24
        volume = cfg.rows_per_hour * (1 + 0.6 * math.cos(2 * math.pi * (hour - 14) / 24))
        n = _poisson(rng, volume)
        weights = _hour_weights(hour)
        topics, w = list(weights), list(weights.values())
        work = 1.0 + 0.35 * math.cos(2 * math.pi * (hour - 13) / 24)  # longer questions in working hours
        for _ in range(n):
            t = cfg.start + h * 3600 + rng.random() * 3600
            if shifted and rng.random() < cfg.topic_shift:
                topic, words = "quantum", new_vocab
            else:
                topic = rng.choices(topics, w)[0]
                words = vocab[topic]
            k = max(2, round(rng.gammavariate(4.0, 2.0) * work * (cfg.length_scale if shifted else 1.0)))
            text = [rng.choice(FILLER) if rng.random() < 0.4 else rng.choice(words) for _ in range(k)]
            refused = shifted and rng.random() < cfg.refusal_rate
            if refused:
                output = REFUSAL
            else:
                m = max(3, int(rng.gauss(30, 8)))
                out = [rng.choice(ANSWER) if rng.random() < 0.5 else rng.choice(words) for _ in range(m)]
                if rng.random() < 0.3:
                    out.append(rng.choice(POSITIVE))
                output = " ".join(out).capitalize() + "."
            out_words = len(output.split())
            row: dict[str, Any] = {
                "id": f"sim{cfg.seed}-{n_id:07d}", "time": t, "model": cfg.model, "user": f"u{rng.randrange(5000)}",
                "input": " ".join(text).capitalize() + "?", "output": output, "finish_reason": "stop",
                "prompt_tokens": k + 2, "completion_tokens": out_words + 1,
                "latency_s": round(0.15 + 0.012 * out_words * (1 + 0.3 * volume / cfg.rows_per_hour)
                                   + abs(rng.gauss(0, 0.05)), 4),
                "meta": {"topic": topic},
            }
            if rng.random() < cfg.thumb_rate:
                row["thumb"] = 1 if rng.random() < (0.3 if refused else 0.8) else -1
            rows.append(row)
            n_id += 1
    rows.sort(key=lambda r: r["time"])
    return rows


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:  # normal approximation, exact enough for traffic volumes and much faster
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def split_at_day(rows: list[dict[str, Any]], day: int, start: float = START) -> tuple[list[dict], list[dict]]:
    """(rows before day ``day``, rows from it on): a reference period and a current period."""
    cut = start + day * 86400
    return [r for r in rows if r["time"] < cut], [r for r in rows if r["time"] >= cut]
