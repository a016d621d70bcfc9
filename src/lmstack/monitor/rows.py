"""Interaction rows for drift and alerts: reading them, and the per-row signals the drift tests compare.

A row is a dict ``{"time", "input", "output", ...}`` with any field of the log store's ``Interaction``
(docs/monitor.md). ``time`` is unix seconds or an ISO 8601 string (a naive one is UTC); :func:`read_rows_jsonl`
turns it into unix seconds and checks every row, so a bad one is an error naming its line and field.

Signals (:func:`compute_signals`, per row; a signal absent from the reference is skipped):

- ``input_len`` / ``output_len``: words in the input / the reply (verbosity);
- ``refusal``: 1 when the reply is a refusal, by the red-team suite's marker list
  (:func:`lmstack.prompts.redteam.is_refusal`, after GCG's evaluation);
- ``sentiment``: (positive - negative) / (positive + negative) words of the reply, a small lexicon (0 when none);
- ``safety``: 1 when the reply trips a safety flag -- an e-mail address, phone number or IP address (the data
  layer's PII masker) or an unsafe-instruction phrase (:data:`UNSAFE_PHRASES`) -- or ``meta.safety_flags`` is set;
- ``oov_rate``: share of the input's words outside the reference vocabulary (words seen >= 2 times), cross-fitted:
  the reference is split in two halves (even / odd rows), each reference row is measured against the other
  half's vocabulary and each current row against one half's (alternating), so a reference row never counts its
  own words as known and both sides see vocabularies of the same size;
- ``topic``: the k-means cluster (fit on the reference inputs' embeddings) of the input; ``topic_novelty``: the
  distance from the input's embedding to the nearest cluster centre of a reference half (cross-fitted as the OOV
  rate: a topic the reference never saw is far from every centre);
- ``embedding``: the input embedding (``row["embedding"]`` if present, else :func:`embed_texts`);
- ``feedback``: 1 when the row carries a thumb; ``thumbs_up``: 1/0 for +1/-1 (NaN without a thumb);
- ``latency_s``, and ``judge_score`` from ``meta.judge_score`` where present.

A thumb is read from ``row["thumb"]``, ``row["meta"]["thumb"]`` or a ``row["feedback"]`` list of
``{"kind": "thumb", "value": +1|-1}`` (the log store's Feedback rows joined onto their interaction).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import DataError

Embed = Callable[[Sequence[str]], np.ndarray]

_WORD = re.compile(r"[a-z0-9']+")
_MAYBE_PII = re.compile(r"[0-9@:]")

POSITIVE = frozenset(["good", "great", "glad", "happy", "excellent", "helpful", "thanks", "thank", "love",
                      "wonderful", "nice", "perfect", "sure", "welcome", "pleasure", "enjoy", "awesome", "fantastic",
                      "amazing", "best", "easy", "clear", "correct", "right", "yes", "absolutely", "certainly"])
NEGATIVE = frozenset(["bad", "sorry", "unfortunately", "wrong", "terrible", "awful", "hate", "poor", "fail", "failed",
                      "error", "problem", "cannot", "can't", "won't", "unable", "difficult", "annoying", "angry",
                      "worst", "never", "no", "not", "impossible", "refuse"])
UNSAFE_PHRASES = ("how to make a bomb", "build a weapon", "kill yourself", "credit card number is",
                  "here is the password", "steal the", "bypass the alarm", "untraceable poison", "make meth")

SIGNALS = ("input_len", "output_len", "refusal", "sentiment", "safety", "oov_rate", "topic", "topic_novelty",
           "embedding", "feedback", "thumbs_up", "latency_s", "judge_score")


# ------------------------------------------------------------------------------------------ reading

def parse_time(value: Any, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: field 'time' must be unix seconds or an ISO 8601 string, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise DataError(f"{where}: field 'time' must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.strip())
        except ValueError:
            raise DataError(f"{where}: field 'time' {value!r} is not ISO 8601 (e.g. 2026-01-05T13:00:00Z) "
                            "or unix seconds") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.timestamp()
    raise DataError(f"{where}: field 'time' must be unix seconds or an ISO 8601 string, got {type(value).__name__}")


_NUMERIC = ("latency_s", "ttft_s", "prompt_tokens", "completion_tokens")


def normalize_row(row: Any, where: str = "row") -> dict[str, Any]:
    """A checked copy of one row (a dict or an ``Interaction``) with ``time`` in unix seconds."""
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        row = dataclasses.asdict(row)
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in ("time", "input", "output"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (rows need time, input and output)")
    out = dict(row)
    out["time"] = parse_time(row["time"], where)
    for key in ("input", "output"):
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    for key in _NUMERIC:
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise DataError(f"{where}: field {key!r} must be a number, got {v!r}")
    if row.get("meta") is not None and not isinstance(row["meta"], dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(row['meta']).__name__}")
    emb = row.get("embedding")
    if emb is not None and (not isinstance(emb, list) or not all(isinstance(x, (int, float)) for x in emb)):
        raise DataError(f"{where}: field 'embedding' must be a list of numbers")
    return out


def read_rows_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file, checked (:func:`normalize_row`) and sorted by time."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"rows file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            rows.append(normalize_row(obj, where))
    rows.sort(key=lambda r: r["time"])
    return rows


def normalize_rows(rows: Iterable[Any]) -> list[dict[str, Any]]:
    out = [normalize_row(r, f"row {i}") for i, r in enumerate(rows)]
    out.sort(key=lambda r: r["time"])
    return out


# ------------------------------------------------------------------------------------------ per-row signals

def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def is_refusal(text: str) -> bool:
    from lmstack.prompts.redteam import is_refusal as redteam_refusal

    return redteam_refusal(text)


def sentiment(text: str) -> float:
    ws = words(text)
    pos = sum(w in POSITIVE for w in ws)
    neg = sum(w in NEGATIVE for w in ws)
    return 0.0 if pos + neg == 0 else (pos - neg) / (pos + neg)


def safety_flags(text: str) -> list[str]:
    """Unsafe-instruction phrases in ``text``, and "email" / "phone" / "ip" where the data layer's PII masker
    (:class:`lmstack.data.clean.PiiMask`, the one PII rule of the stack) finds one."""
    from lmstack.data.clean import PiiMask

    low = text.lower()
    flags = [p for p in UNSAFE_PHRASES if p in low]
    if _MAYBE_PII.search(text):  # an e-mail, phone or IP needs one of these characters: skip the masker without
        masked = PiiMask(email_token="\0EMAIL\0", phone_token="\0PHONE\0", ip_token="\0IP\0")(text)
        flags += [name for name in ("email", "phone", "ip") if f"\0{name.upper()}\0" in masked]
    return flags


def thumb(row: dict[str, Any]) -> float | None:
    """+1 / -1 where the row carries a thumb, else None."""
    for v in (row.get("thumb"), (row.get("meta") or {}).get("thumb")):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return 1.0 if v > 0 else -1.0
    for fb in row.get("feedback") or ():
        if isinstance(fb, dict) and fb.get("kind") == "thumb" and isinstance(fb.get("value"), (int, float)):
            return 1.0 if fb["value"] > 0 else -1.0
    return None


def hashed_embed(texts: Sequence[str], dim: int = 256) -> np.ndarray:
    """A fast, offline, deterministic text embedding: signed feature hashing (Weinberger et al. 2009) of word
    unigrams and character 3-grams (of each word with boundary marks) into ``dim`` buckets, L2-normalised.
    CRC-32 is the hash, so vectors are the same on every machine and Python run."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        feats = []
        for w in words(text):
            feats.append("w:" + w)
            padded = f"<{w}>"
            feats += [padded[j:j + 3] for j in range(len(padded) - 2)]
        for f in feats:
            h = zlib.crc32(f.encode())
            out[i, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def rag_embedder(path: str | os.PathLike | None = None) -> Embed:
    """The retrieval layer's sentence encoder (:class:`lmstack.rag.embed.Embedder`, MiniLM by default) as an
    ``embed_texts`` function; needs torch and the encoder folder."""
    from lmstack.rag.embed import Embedder

    enc = Embedder(path)
    return lambda texts: np.asarray(enc.embed(list(texts)), np.float32)


def embedder(spec: str | None) -> Embed:
    """``None`` / ``"hashed"``: :func:`hashed_embed`; ``"rag"``: the RAG layer's default encoder; a folder path:
    that encoder."""
    if spec in (None, "", "hashed"):
        return hashed_embed
    return rag_embedder(None if spec == "rag" else spec)


def attach_feedback(rows: Sequence[dict[str, Any]], feedback: Iterable[Any]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with each row's feedback (the log store's Feedback rows or dicts, matched on
    ``interaction_id`` = the row's ``id``) as a ``feedback`` list, the form :func:`thumb` reads."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for fb in feedback:
        d = dataclasses.asdict(fb) if dataclasses.is_dataclass(fb) and not isinstance(fb, type) else dict(fb)
        by_id.setdefault(str(d.get("interaction_id")), []).append(d)
    return [{**r, "feedback": list(r.get("feedback") or []) + by_id.get(str(r.get("id")), [])} for r in rows]


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Centroids of Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    centres = [x[rng.integers(len(x))]]
    d2 = np.sum((x - centres[0]) ** 2, 1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres.append(x[rng.choice(len(x), p=probs)])
        d2 = np.minimum(d2, np.sum((x - centres[-1]) ** 2, 1))
    c = np.array(centres)
    for _ in range(iters):
        assign = nearest(x, c)
        new = np.array([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c


def nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (centres * centres).sum(1)[None, :] - 2 * x @ centres.T
    return np.argmin(d, 1)


@dataclass
class SignalContext:
    """What the signals learn from the reference: its two half-vocabularies, the topic centroids (and those of each
    half, for the cross-fitted novelty), the embedder."""
    vocabs: tuple[frozenset[str], frozenset[str]]
    centroids: np.ndarray
    half_centroids: tuple[np.ndarray, np.ndarray]
    embed: Embed = field(default=hashed_embed, repr=False)
    has: dict[str, bool] = field(default_factory=dict)


def embed_rows(rows: Sequence[dict[str, Any]], embed: Embed) -> np.ndarray:
    if rows and all(r.get("embedding") for r in rows):
        return np.asarray([r["embedding"] for r in rows], np.float32)
    return np.asarray(embed([r["input"] for r in rows]), np.float32)


def fit_context(reference: Sequence[dict[str, Any]], embed: Embed | None = None, n_topics: int = 8,
                seed: int = 0, max_fit: int = 5000, embeddings: np.ndarray | None = None) -> SignalContext:
    """Fit on the reference rows (``embeddings``: theirs, if already computed, in the same order)."""
    embed = embed or hashed_embed
    reference = list(reference)
    vocabs = []
    for fold in (0, 1):
        counts = Counter(w for r in reference[fold::2] for w in words(r["input"]))
        vocabs.append(frozenset(w for w, c in counts.items() if c >= 2))
    rng = np.random.default_rng(seed)
    emb = embeddings if embeddings is not None else embed_rows(reference, embed)

    def fit(idx: np.ndarray, limit: int) -> np.ndarray:
        if len(idx) > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        return kmeans(emb[idx], n_topics, seed=seed)

    everything = np.arange(len(reference))
    centroids = fit(everything, max_fit)
    halves = (fit(everything[0::2], max_fit // 2), fit(everything[1::2], max_fit // 2)) if len(reference) > 1 \
        else (centroids, centroids)
    has = {"latency_s": any(r.get("latency_s") for r in reference),
           "feedback": any(thumb(r) is not None for r in reference),
           "judge_score": any(isinstance((r.get("meta") or {}).get("judge_score"), (int, float)) for r in reference)}
    return SignalContext((vocabs[0], vocabs[1]), centroids, halves, embed, has)


def compute_signals(rows: Sequence[dict[str, Any]], ctx: SignalContext, reference: bool = False,
                    embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row signal arrays (see the module docstring); ``embedding`` is 2-D, the rest 1-D. ``reference``: these
    are the rows ``ctx`` was fit on, in the same order (their OOV rate and topic novelty are measured against the
    other half). ``embeddings``: the rows' embeddings if already computed."""
    n = len(rows)
    sig: dict[str, np.ndarray] = {}
    in_words = [words(r["input"]) for r in rows]
    sig["input_len"] = np.array([len(w) for w in in_words], float)
    sig["output_len"] = np.array([len(words(r["output"])) for r in rows], float)
    sig["refusal"] = np.array([is_refusal(r["output"]) for r in rows], float)
    sig["sentiment"] = np.array([sentiment(r["output"]) for r in rows], float)
    sig["safety"] = np.array([bool(safety_flags(r["output"]) or (r.get("meta") or {}).get("safety_flags"))
                              for r in rows], float)
    oov = []
    for i, ws in enumerate(in_words):
        vocab = ctx.vocabs[(i + reference) % 2]  # reference row i (half i % 2) uses the other half's vocabulary
        oov.append(sum(w not in vocab for w in ws) / len(ws) if ws else 0.0)
    sig["oov_rate"] = np.array(oov)
    if embeddings is not None:
        emb = np.asarray(embeddings, np.float32)
    else:
        emb = embed_rows(rows, ctx.embed) if n else np.zeros((0, ctx.centroids.shape[1]), np.float32)
    if n and emb.shape[1] != ctx.centroids.shape[1]:
        raise DataError(f"input embeddings have {emb.shape[1]} dimensions here but {ctx.centroids.shape[1]} in the "
                        "reference: give every row an 'embedding' from the same encoder, or none (then all are "
                        "embedded alike)")
    sig["embedding"] = emb
    sig["topic"] = nearest(emb, ctx.centroids).astype(float) if n else np.zeros(0)
    # distance to the nearest topic centre of a reference half (cross-fitted like the OOV rate): a topic the
    # reference never saw lands far from all of them
    novelty = np.zeros(n)
    for fold in (0, 1):
        idx = np.arange((fold + reference) % 2, n, 2)  # rows that use half `fold`'s centres
        if len(idx):
            c = ctx.half_centroids[fold]
            d2 = (emb[idx] ** 2).sum(1)[:, None] + (c**2).sum(1)[None, :] - 2 * emb[idx] @ c.T
            novelty[idx] = np.sqrt(np.maximum(d2.min(1), 0.0))
    sig["topic_novelty"] = novelty
    if ctx.has.get("latency_s"):
        sig["latency_s"] = np.array([float(r.get("latency_s") or 0.0) for r in rows])
    if ctx.has.get("feedback"):
        thumbs = [thumb(r) for r in rows]
        sig["feedback"] = np.array([t is not None for t in thumbs], float)
        sig["thumbs_up"] = np.array([np.nan if t is None else float(t > 0) for t in thumbs])
    if ctx.has.get("judge_score"):
        sig["judge_score"] = np.array([float((r.get("meta") or {}).get("judge_score", np.nan)) for r in rows])
    return sig
