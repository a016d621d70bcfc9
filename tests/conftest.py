"""Shared fixtures. Tests are hermetic: tiny models and data built here, nothing fetched from a hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` when present; tests that need it skip with a clear message where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (optional: see shared/data/README.md)")
    return SHARED_DATA


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(params=["fixtures", "shared"])
def eval_data(request) -> Path:
    """A data root holding ``eval/HumanEval.jsonl.gz`` and ``eval/reference_tests/``: the tiny in-repo copy in
    tests/fixtures (always), and ``../shared/data`` (the real files; skipped where absent)."""
    if request.param == "fixtures":
        return FIXTURES
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (optional: see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
