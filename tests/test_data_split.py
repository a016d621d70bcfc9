"""The one held-out rule (lmstack.data.split) and the callers that must all use it."""

from __future__ import annotations

import pytest

from lmstack.data.split import heldout_hash, is_heldout
from lmstack.errors import ConfigError


def test_heldout_hash_is_pinned_across_runs_and_machines():
    # BLAKE2b-64 keyed by the seed: these values must never change, or every stored split moves
    assert heldout_hash("hello", 0) == heldout_hash(b"hello", 0)
    assert heldout_hash("hello", 0) != heldout_hash("hello", 1)
    assert [is_heldout(f"doc {i}", 0.5, 0) for i in range(8)] == [is_heldout(f"doc {i}", 0.5, 0) for i in range(8)]


def test_heldout_fraction_is_respected_and_monotone():
    keys = [f"document number {i}" for i in range(20_000)]
    share = sum(is_heldout(k, 0.05) for k in keys) / len(keys)
    assert 0.045 < share < 0.055
    small = {k for k in keys if is_heldout(k, 0.02)}
    large = {k for k in keys if is_heldout(k, 0.10)}
    assert small < large  # growing the fraction only adds documents to the held-out side
    assert not any(is_heldout(k, 0.0) for k in keys[:100]) and all(is_heldout(k, 1.0) for k in keys[:100])


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_heldout_fraction_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="held-out fraction"):
        is_heldout("x", bad)


def test_data_prepare_and_default_corpus_use_the_rule(tmp_path):
    import json

    from lmstack.data.corpus import CorpusConfig, build_default_corpus

    cfg = CorpusConfig(sources=("topics",), valid_fraction=0.2)
    build_default_corpus(tmp_path, cfg)
    held = [json.loads(x)["text"] for x in (tmp_path / "valid.jsonl").read_text().splitlines()]
    kept = [json.loads(x)["text"] for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert held and all(is_heldout(t, 0.2, cfg.seed) for t in held)
    assert not any(is_heldout(t, 0.2, cfg.seed) for t in kept)
