"""lmstack.rag.embed: MiniLM embeddings equal to sentence-transformers' (cosine >= 1 - 1e-5), long inputs
truncated as sentence-transformers truncates them, the on-disk cache, prefixes, the embedder id."""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.errors import ConfigError


@pytest.fixture(scope="module")
def embedder():
    from lmstack.rag.embed import Embedder

    emb = Embedder(batch_size=8)
    try:
        assert emb.id
    except ConfigError as e:
        pytest.skip(str(e))
    return emb


TEXTS = ["The cat sat on the mat.", "Short.", "A somewhat longer sentence about retrieval, indexes and 2024 data.",
         "Paris is the capital of France.", "lmstack indexes documents; BM25 and dense retrieval are fused.",
         "word " * 400]  # longer than the 256-token window


def test_matches_sentence_transformers_including_truncation(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(embedder.path), device="cpu").encode(TEXTS, batch_size=4)
    before = embedder.truncated
    ours = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 1 - 1e-5, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert embedder.truncated - before == 1 and embedder.max_length == 256
    assert len(embedder.token_ids(["word " * 400])[0]) == 256


def test_cache_returns_the_same_vectors_without_encoding(embedder, tmp_path, monkeypatch):
    from lmstack.rag.embed import Embedder

    cached = Embedder(batch_size=8, cache_dir=tmp_path)
    first = cached.embed(TEXTS[:4])
    again = Embedder(batch_size=8, cache_dir=tmp_path)  # a new process would see the same files
    monkeypatch.setattr(again, "_encode", lambda *a, **k: pytest.fail("encoded a cached text"))
    np.testing.assert_array_equal(again.embed(TEXTS[:4]), first)
    # a torn record (a killed writer) is dropped, and the cache keeps working
    folder = next(tmp_path.iterdir())
    with open(folder / "keys.txt", "ab") as f:
        f.write(b"deadbeef")
    with open(folder / "vectors.f32", "ab") as f:
        f.write(b"\x00\x01")
    third = Embedder(batch_size=8, cache_dir=tmp_path)
    np.testing.assert_array_equal(third.embed(TEXTS[:4]), first)
    np.testing.assert_allclose(third.embed([TEXTS[4]]), embedder.embed([TEXTS[4]]), atol=1e-6)
    assert (folder / "keys.txt").read_text().count("\n") == 5


def test_prefixes_change_the_id_and_the_vectors(embedder):
    from lmstack.rag.embed import Embedder

    e5 = Embedder(query_prefix="query: ", document_prefix="passage: ")
    assert e5.id != embedder.id and e5.id.startswith(embedder.id)
    q = e5.query("capital of France")
    np.testing.assert_allclose(q.vector, embedder.embed(["query: capital of France"])[0], atol=1e-6)
    assert q.embedder_id == e5.id
    spec = e5.spec()
    assert Embedder.from_spec(spec).id == e5.id
    with pytest.raises(ConfigError, match="the model changed"):
        Embedder.from_spec({**spec, "id": "other@123/256"})


def test_a_missing_embedder_folder_is_one_line(tmp_path):
    from lmstack.rag.embed import Embedder

    with pytest.raises(ConfigError, match="no such folder"):
        assert Embedder(tmp_path / "nope").id
