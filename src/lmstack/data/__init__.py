"""Pre-training data: read, clean, deduplicate, mix, tokenize and pack text into shards, then load blocks.

The flow, one module per stage::

    sources.py   files/folders/globs -> Document stream (HTML, text, books, code; JSONL/Parquet rows)
    clean.py     composable steps: HTML to text, Unicode, boilerplate lines, quality, language, PII, book, code
    dedup.py     exact (normalised hash) and near-duplicate (MinHash + LSH) removal, with clusters
    mix.py       per-source weights (epochs or token shares) -> a sampling plan and a table
    pack.py      parallel tokenization into memory-mapped .bin shards (uint16/uint32) + index.json
    loader.py    BlockLoader: (x, y) blocks, seeded shuffle across shards, rank sharding, exact resume
    pipeline.py  ``lmstack data prepare CONFIG``: all of the above, plus data_report.md

Submodules are imported on use (``from lmstack.data.loader import BlockLoader``), so reading text does not
pull in torch and tokenizer workers start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Document": "sources", "iter_source": "sources",
    "Reject": "clean", "StepStats": "clean", "apply_steps": "clean", "build_steps": "clean",
    "ExactDedup": "dedup", "NearDedup": "dedup", "MinHasher": "dedup",
    "MixPlan": "mix", "plan_mix": "mix",
    "ShardWriter": "pack", "open_shards": "pack", "tokenize_stream": "pack",
    "BlockLoader": "loader", "validation_batches": "loader",
    "PrepareConfig": "pipeline", "prepare": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmstack.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmstack.data' has no attribute {name!r}")
