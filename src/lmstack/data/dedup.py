"""Document-level deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH).

Both are streaming steps with the same interface as the cleaning steps (call on a text, get the text or a
:class:`~lmstack.data.clean.Reject`): the first document of a cluster is kept, later members go.

Near duplicates, the maths (Broder 1997; Leskovec et al., *Mining of Massive Datasets*, ch. 3):

- a document is the set of its word ``ngram`` shingles (lower-cased words, punctuation dropped);
- MinHash: for each of ``num_perm`` hash functions h_i(x) = (a_i x + b_i) mod p (p = 2^31 - 1, the
  Mersenne prime, so a_i x stays inside 64 bits), the signature keeps min over shingles of h_i; two
  documents agree on one signature entry with probability equal to their Jaccard similarity J;
- LSH: the signature is cut into ``bands`` of ``rows``; documents sharing all rows of any band become
  candidates, with probability 1 - (1 - J^rows)^bands, an S-curve whose knee sits near the threshold.
  :func:`lsh_params` picks bands and rows for a threshold by minimising the false-positive area below it
  plus the false-negative area above it;
- a candidate is confirmed when the fraction of equal signature entries (the estimate of J) reaches the
  threshold, which removes most of the S-curve's false positives.

Memory: the kept documents' signatures (4 bytes x ``num_perm``) and one bucket entry per band.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lmstack.data.clean import Reject, snippet
from lmstack.errors import ConfigError

MERSENNE = np.uint64((1 << 31) - 1)
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def normalise_for_hash(text: str) -> str:
    """Lower-case words only, single-spaced: the form two "identical" documents share."""
    return " ".join(_WORD.findall(text.lower()))


def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted error areas around ``threshold``."""
    s_low = np.linspace(0.0, threshold, 201)
    s_high = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        fp = np.trapezoid(1 - (1 - s_low ** rows) ** bands, s_low)
        fn = np.trapezoid((1 - s_high ** rows) ** bands, s_high)
        err = false_positive_weight * fp + (1 - false_positive_weight) * fn
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class MinHasher:
    """MinHash signatures of word n-gram shingles, vectorised with numpy."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if num_perm < 2 or ngram < 1:
            raise ConfigError("dedup: num_perm must be >= 2 and ngram >= 1")
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, int(MERSENNE), num_perm, dtype=np.uint64)[:, None]  # (P, 1)
        self.b = rng.integers(0, int(MERSENNE), num_perm, dtype=np.uint64)[:, None]  # (P, 1)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct shingle hashes in [0, p) of the text's word n-grams (the whole text if it is shorter)."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(0, dtype=np.uint64)
        ids = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        n = min(self.ngram, len(ids))
        keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                keys = keys * _MIX + ids[k: len(ids) - n + 1 + k]
        keys ^= keys >> np.uint64(29)
        return np.unique(keys % MERSENNE)

    def signature(self, text: str, chunk: int = 4096) -> np.ndarray:
        """(num_perm,) uint32 minimum of each hash function over the shingles; all-max for empty text."""
        x = self.shingles(text)
        sig = np.full(self.num_perm, int(MERSENNE), dtype=np.uint64)
        for i in range(0, len(x), chunk):
            h = (self.a * x[None, i: i + chunk] + self.b) % MERSENNE  # (P, chunk)
            np.minimum(sig, h.min(axis=1), out=sig)
        return sig.astype(np.uint32)


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    h = MinHasher(2, ngram)
    sa, sb = set(h.shingles(a).tolist()), set(h.shingles(b).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


@dataclass
class DedupStats:
    """Clusters with at least one removed member, and up to ``max_examples`` of them with snippets."""
    clusters: int = 0
    removed: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "removed": self.removed, "examples": self.examples}


class _Tracker:
    """Cluster bookkeeping shared by both dedup steps."""

    def __init__(self, max_examples: int, max_snippets: int = 20_000):
        self.stats = DedupStats()
        self.sizes: dict[int, int] = {}          # kept doc id -> removed members
        self.snippets: dict[int, str] = {}
        self.max_examples, self.max_snippets = max_examples, max_snippets
        self.kept = 0

    def keep(self, text: str) -> int:
        doc_id = self.kept
        self.kept += 1
        if doc_id < self.max_snippets:
            self.snippets[doc_id] = snippet(text, 160)
        return doc_id

    def duplicate(self, rep: int, text: str, **extra: Any) -> None:
        self.stats.removed += 1
        if self.sizes.get(rep, 0) == 0:
            self.stats.clusters += 1
        self.sizes[rep] = self.sizes.get(rep, 0) + 1
        if len(self.stats.examples) < self.max_examples:
            self.stats.examples.append({"kept": self.snippets.get(rep, "?"), "removed": snippet(text, 160), **extra})


class ExactDedup:
    """Drop documents whose normalised text (lower-case words, no punctuation) was seen before."""
    name: ClassVar[str] = "exact_dedup"

    def __init__(self, max_examples: int = 3):
        self._seen: dict[bytes, int] = {}
        self._track = _Tracker(max_examples)

    @property
    def stats(self) -> DedupStats:
        return self._track.stats

    def __call__(self, text: str) -> str | Reject:
        key = hashlib.blake2b(normalise_for_hash(text).encode(), digest_size=16).digest()
        rep = self._seen.get(key)
        if rep is not None:
            self._track.duplicate(rep, text)
            return Reject("exact_duplicate")
        self._seen[key] = self._track.keep(text)
        return text


class NearDedup:
    """Drop documents whose estimated Jaccard similarity to a kept document reaches ``threshold``."""
    name: ClassVar[str] = "near_dedup"

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, ngram: int = 5, seed: int = 0,
                 bands: int = 0, rows: int = 0, max_examples: int = 3):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"dedup.threshold: must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, ngram, seed)
        if bands and rows:
            if bands * rows > num_perm:
                raise ConfigError(f"dedup: bands x rows = {bands * rows} exceeds num_perm = {num_perm}")
            self.bands, self.rows = bands, rows
        else:
            self.bands, self.rows = lsh_params(threshold, num_perm)
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[np.ndarray] = []
        self._track = _Tracker(max_examples)

    @property
    def stats(self) -> DedupStats:
        return self._track.stats

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def query(self, sig: np.ndarray) -> tuple[int, float] | None:
        """The best kept document whose estimated similarity reaches the threshold, with that estimate."""
        candidates: set[int] = set()
        for table, key in zip(self._tables, self._band_keys(sig)):
            candidates.update(table.get(key, ()))
        best: tuple[int, float] | None = None
        for c in sorted(candidates):
            est = float(np.mean(self._sigs[c] == sig))
            if est >= self.threshold and (best is None or est > best[1]):
                best = (c, est)
        return best

    def __call__(self, text: str) -> str | Reject:
        sig = self.hasher.signature(text)
        hit = self.query(sig)
        if hit is not None:
            self._track.duplicate(hit[0], text, similarity=round(hit[1], 3))
            return Reject("near_duplicate")
        doc_id = self._track.keep(text)
        self._sigs.append(sig)
        for table, key in zip(self._tables, self._band_keys(sig)):
            table.setdefault(key, []).append(doc_id)
        return text


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.7        # Jaccard similarity of word-shingle sets at which documents are duplicates
    num_perm: int = 128
    ngram: int = 5
    bands: int = 0                # 0: derived from threshold and num_perm (see lsh_params)
    rows: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold: must be in (0, 1], got {self.threshold}")
        if (self.bands == 0) != (self.rows == 0):
            raise ConfigError("dedup: set both bands and rows, or neither")

    def make_steps(self, max_examples: int = 3) -> list[Callable[[str], Any]]:
        steps: list[Callable[[str], Any]] = []
        if self.exact:
            steps.append(ExactDedup(max_examples))
        if self.near:
            steps.append(NearDedup(self.threshold, self.num_perm, self.ngram, self.seed, self.bands, self.rows,
                                   max_examples))
        return steps
