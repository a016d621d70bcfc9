"""Tokenize-and-pack, the block loader (shuffle, rank sharding, exact resume) and the mixing plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.data.loader import BlockLoader, validation_batches
from lmstack.data.mix import MixConfig, plan_mix
from lmstack.data.pack import ShardWriter, open_shards, pack_texts, token_dtype, tokenize_stream
from lmstack.errors import ConfigError, DataError


class ByteTokenizer:
    """A stand-in with the Tokenizer interface: UTF-8 bytes are ids 0-255, EOS is 256."""
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def save(self, directory) -> None:
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.json").write_text(json.dumps({"kind": "bytes"}))


TEXTS = [f"document {i}: " + "héllo wörld " * (i % 7 + 1) for i in range(300)]


def test_token_dtype_by_vocab_size():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_parallel_tokenization_matches_serial_in_order():
    tok = ByteTokenizer()
    serial = list(tokenize_stream(TEXTS, tok, workers=1, chunk_docs=16))
    parallel = list(tokenize_stream(iter(TEXTS), tok, workers=2, chunk_docs=7))
    assert len(parallel) == len(TEXTS)
    for text, a, b in zip(TEXTS, serial, parallel):
        assert a.tolist() == b.tolist() == tok.encode(text)


def test_shards_hold_documents_separated_by_eos(tmp_path):
    tok = ByteTokenizer()
    index = pack_texts(TEXTS, tok, tmp_path / "set", shard_tokens=5000, workers=2, meta={"note": "x"})
    assert len(index["shards"]) > 1
    assert index["dtype"] == "uint16" and index["eos_id"] == 256 and index["meta"]["note"] == "x"
    assert index["documents"] == len(TEXTS)
    assert index["tokens"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)
    assert json.loads((tmp_path / "set" / "index.json").read_text()) == index
    shards = open_shards(tmp_path / "set")
    stream = np.concatenate([np.asarray(a) for a in shards.arrays])
    docs = np.split(stream, np.nonzero(stream == 256)[0] + 1)[:-1]
    assert [bytes(d[:-1].astype(np.uint8)).decode("utf-8") for d in docs] == TEXTS
    for shard, arr in zip(index["shards"], shards.arrays):
        assert arr[-1] == 256 and len(arr) == shard["tokens"]  # shards hold whole documents


def test_large_vocab_uses_uint32_and_ids_are_checked(tmp_path):
    with ShardWriter(tmp_path / "big", vocab_size=100_000, eos_id=99_999) as w:
        w.add([70_000, 5])
    assert open_shards(tmp_path / "big").arrays[0].tolist() == [70_000, 5, 99_999]
    assert w.index["dtype"] == "uint32"
    with pytest.raises(DataError, match="out of range"):
        with ShardWriter(tmp_path / "bad", vocab_size=10, eos_id=9) as w:
            w.add([3, 12])
    assert not (tmp_path / "bad").exists()  # a failed write leaves nothing behind


def test_open_shards_detects_a_truncated_shard(tmp_path):
    pack_texts(TEXTS[:20], ByteTokenizer(), tmp_path / "set", workers=1)
    shard = tmp_path / "set" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(DataError, match="index.json says"):
        open_shards(tmp_path / "set")
    with pytest.raises(DataError, match="not found"):
        open_shards(tmp_path / "nothing")


@pytest.fixture
def shard_dir(tmp_path):
    # token i of the stream is i % 251 (never the EOS id) so every block is identifiable by its content
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "set", vocab_size=257, eos_id=256, shard_tokens=900) as w:
        for n in rng.integers(20, 200, size=60):
            w.add(rng.integers(0, 256, size=n))
    return tmp_path / "set"


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_blocks_shift_by_one_and_cover_each_block_once_per_epoch(shard_dir):
    loader = BlockLoader(shard_dir, block_size=16, batch_size=4, seed=0)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    shards = open_shards(shard_dir)
    starts = set()
    loader = BlockLoader(shard_dir, block_size=16, batch_size=4, seed=0)
    for _ in range(len(loader)):
        x, y = loader.next_batch()
        for row_x, row_y in zip(x, y):
            # find which block this is: compare with every block of every shard
            full = torch.cat([row_x, row_y[-1:]]).numpy()
            hits = [(s, j) for s, a in enumerate(shards.arrays) for j in range((len(a) - 1) // 16)
                    if np.array_equal(np.asarray(a[j * 16: j * 16 + 17]), full)]
            assert len(hits) >= 1
            starts.add(hits[0])
    assert len(starts) == len(loader) * 4  # no block twice within an epoch
    assert len(loader) == loader.index.train_blocks // 4


def test_shuffle_is_seeded_and_spans_shards(shard_dir):
    a = BlockLoader(shard_dir, 16, 4, seed=1)
    b = BlockLoader(shard_dir, 16, 4, seed=1)
    c = BlockLoader(shard_dir, 16, 4, seed=2)
    batches_a, batches_b, batches_c = _take(a, 5), _take(b, 5), _take(c, 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches_a, batches_b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(batches_a, batches_c))
    shard_of = a.index.locate(a._permutation()[:20])[0]
    assert len(set(shard_of.tolist())) > 1  # consecutive blocks come from different shards


def test_ranks_read_disjoint_blocks_that_together_match_one_process(shard_dir):
    single = BlockLoader(shard_dir, 16, 4, seed=3)
    r0 = BlockLoader(shard_dir, 16, 2, seed=3, rank=0, world_size=2)
    r1 = BlockLoader(shard_dir, 16, 2, seed=3, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(single)
    for _ in range(len(single)):
        x, _ = single.next_batch()
        x0, _ = r0.next_batch()
        x1, _ = r1.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x)


def test_resume_mid_epoch_yields_the_exact_next_batch(shard_dir):
    reference = BlockLoader(shard_dir, 16, 3, seed=7)
    ref = _take(reference, 2 * len(reference) + 5)  # runs past two epoch boundaries
    for stop in (1, 5, len(reference) - 1, len(reference), len(reference) + 3):
        first = BlockLoader(shard_dir, 16, 3, seed=7)
        _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # the state survives a JSON checkpoint
        resumed = BlockLoader(shard_dir, 16, 3, seed=7)
        resumed.load_state_dict(state)
        for k, (x, y) in enumerate(_take(resumed, 4)):
            assert torch.equal(x, ref[stop + k][0]) and torch.equal(y, ref[stop + k][1]), (stop, k)


def test_resume_on_a_different_world_size(shard_dir):
    one = BlockLoader(shard_dir, 16, 2, seed=0, world_size=2, rank=0)
    _take(one, 3)
    single = BlockLoader(shard_dir, 16, 4, seed=0)  # same global batch, one process
    single.load_state_dict(one.state_dict())
    ref = BlockLoader(shard_dir, 16, 4, seed=0)
    _take(ref, 3)
    assert torch.equal(single.next_batch()[0], ref.next_batch()[0])


def test_resume_refuses_a_different_setup(shard_dir):
    state = BlockLoader(shard_dir, 16, 4, seed=0).state_dict()
    with pytest.raises(DataError, match="block_size"):
        BlockLoader(shard_dir, 32, 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        BlockLoader(shard_dir, 16, 4, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="cannot fill one step"):
        BlockLoader(shard_dir, 16, 10_000)
    with pytest.raises(ConfigError, match="rank"):
        BlockLoader(shard_dir, 16, 4, rank=2, world_size=2)


def test_holdout_blocks_are_never_trained_on(shard_dir):
    loader = BlockLoader(shard_dir, 16, 4, seed=0, holdout=0.1)
    lo, hi = loader.index.val_range
    assert hi - lo == round(loader.index.total * 0.1) and hi == loader.index.total
    trained = set()
    for _ in range(3):  # three epochs
        for _ in range(len(loader)):
            lo_id = loader.step * loader.global_batch
            trained.update(loader._permutation()[lo_id: lo_id + 4].tolist())
            loader.next_batch()
    assert trained.isdisjoint(range(lo, hi))
    val = list(validation_batches(shard_dir, 16, 4, holdout=0.1))
    assert sum(len(x) for x, _ in val) == hi - lo
    again = list(validation_batches(shard_dir, 16, 4, holdout=0.1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again))  # deterministic
    everything = list(validation_batches(shard_dir, 16, 4, max_batches=3))
    assert len(everything) == 3 and all(x.shape == (4, 16) for x, _ in everything)


def test_mix_by_epochs_repeats_and_subsamples():
    tokens = [np.full(100, 10), np.full(50, 20), np.arange(1, 41)]
    plan = plan_mix(["a", "b", "c"], tokens, [2.0, 0.5, 1.0], MixConfig(seed=0))
    rows = {r.name: r for r in plan.rows}
    assert rows["a"].mixed_docs == 200 and rows["a"].mixed_tokens == 2000
    assert rows["b"].mixed_tokens == 500 and rows["b"].mixed_docs == 25  # half of the tokens
    assert rows["c"].mixed_tokens == int(np.arange(1, 41).sum())
    assert len(plan.order) == 200 + 25 + 40
    per_source = np.bincount(plan.order[:, 0], minlength=3)
    assert per_source.tolist() == [200, 25, 40]
    a_docs = plan.order[plan.order[:, 0] == 0, 1]
    assert np.bincount(a_docs).tolist() == [2] * 100  # every document of a exactly twice
    assert plan.order[:10, 0].tolist() != sorted(plan.order[:10, 0].tolist())  # sources are interleaved
    assert "| a | 100 | 1,000 | 2 | 2.000 | 200 | 2,000 |" in plan.table()


def test_mix_by_token_shares():
    tokens = [np.full(100, 10), np.full(100, 30)]  # 1,000 and 3,000 tokens
    plan = plan_mix(["a", "b"], tokens, [1.0, 1.0], MixConfig(by="tokens", total_tokens=2000))
    rows = {r.name: r for r in plan.rows}
    assert rows["a"].epochs == pytest.approx(1.0) and rows["b"].epochs == pytest.approx(1 / 3)
    assert rows["a"].mixed_tokens == 1000 and abs(rows["b"].mixed_tokens - 1000) <= 30
    with pytest.raises(ConfigError):
        plan_mix(["a"], [np.ones(3)], [-1.0])


def test_packing_with_a_trained_bpe_round_trips(tmp_path):
    from lmstack.tokenizer import load_tokenizer, train_bpe

    corpus = [f"The {w} crossed the river at dawn, and the {w} rested on the far bank." for w in
              ("fox", "heron", "otter", "deer", "badger", "swan")] * 5
    tok = train_bpe(corpus, vocab_size=320, workers=1)
    tok.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    parallel = list(tokenize_stream(corpus, tok, workers=2, chunk_docs=4))
    assert [p.tolist() for p in parallel] == [tok.encode(t) for t in corpus]
    index = pack_texts(corpus, tok, tmp_path / "set", shard_tokens=200, workers=2)
    assert index["vocab_size"] == tok.vocab_size and index["eos_id"] == tok.eos_id and index["dtype"] == "uint16"
    stream = np.concatenate([np.asarray(a) for a in open_shards(tmp_path / "set").arrays])
    docs = np.split(stream, np.nonzero(stream == tok.eos_id)[0] + 1)[:-1]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == corpus
