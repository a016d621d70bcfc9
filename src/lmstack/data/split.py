"""The one held-out rule: ``is_heldout(key, fraction, seed)``.

A document (or an SFT example) is held out when a keyed hash of it falls in the lowest ``fraction`` of the
64-bit range. The rule depends on nothing but the key, the fraction and the seed, so the split is the same
across runs, machines, worker counts and file orders, and a document keeps its side when others are added.
Every split in lmstack calls it: the default corpus, ``data prepare``, user inputs of the speedrun and the
trainer's text inputs, and SFT data.
"""

from __future__ import annotations

import hashlib

from lmstack.errors import ConfigError


def heldout_hash(key: str | bytes, seed: int = 0) -> int:
    """A 64-bit hash of ``key`` under ``seed`` (BLAKE2b; stable across Python versions and machines)."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
    digest = hashlib.blake2b(data, digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little")


def is_heldout(key: str | bytes, fraction: float, seed: int = 0) -> bool:
    """True when ``key`` belongs to the held-out ``fraction`` (0 holds nothing out, 1 everything)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"held-out fraction must be in [0, 1], got {fraction!r}")
    return fraction > 0 and heldout_hash(key, seed) < fraction * 2.0**64
