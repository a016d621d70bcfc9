"""lmstack.rag.index: exact/HNSW/IVF-PQ/BM25/hybrid search, add+delete restores results, filters, bit-exact
save/load, corrupt files, another embedder's query refused, a killed save leaves the previous index."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmstack.errors import ConfigError, DataError
from lmstack.rag import BM25Index, Chunk, DenseIndex, HybridIndex, Index, Query, load_index

WORDS = ["apple", "banana", "cherry", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def corpus(n: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    chunks = [Chunk(f"c{i}", f"doc{i // 2}", f"src{i % 3}.md", 0, 10,
                    " ".join(rng.choice(WORDS, size=8)), ("H",), "", {"lang": "en" if i % 2 else "de"})
              for i in range(n)]
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return chunks, vecs


def query(v, emb="emb-a"):
    return Query("apple banana " + " ".join(WORDS[2:]), v, emb)


def results(index, queries, k=5, where=None):
    return [[(h.chunk.id, h.score) for h in index.search(q, k, where)] for q in queries]


def make(kind: str, n: int = 300, dim: int = 16):
    chunks, vecs = corpus(n, dim)
    if kind == "bm25":
        index = BM25Index()
        index.add(chunks)
    elif kind == "hybrid":
        index = HybridIndex(BM25Index(), DenseIndex("emb-a", dim))
        index.add(chunks, vecs)
    else:
        index = DenseIndex("emb-a", dim, kind, nlist=4, pq_m=4)
        index.add(chunks, vecs)
    return index, chunks, vecs


KINDS = ["bm25", "exact", "hnsw", "ivfpq", "hybrid"]


def test_exact_is_one_matrix_product():
    index, _, vecs = make("exact")
    q = vecs[7] + 0.1 * vecs[3]
    q /= np.linalg.norm(q)
    hits = index.search(query(q), 10)
    expect = np.argsort(-(vecs @ q), kind="stable")[:10]
    assert [h.chunk.id for h in hits] == [f"c{i}" for i in expect]
    np.testing.assert_allclose([h.score for h in hits], (vecs @ q)[expect], rtol=1e-6)
    assert isinstance(index, Index)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_faiss_agrees_with_exact(kind):
    pytest.importorskip("faiss")
    exact, _, vecs = make("exact", 600)
    approx, _, _ = make(kind, 600)
    if kind == "ivfpq":
        approx.params["nprobe"] = 4  # all lists: only the product quantisation differs
    qs = [query(vecs[i]) for i in range(0, 600, 37)]
    overlap = [len({c for c, _ in a} & {c for c, _ in b}) / 5 for a, b in zip(results(exact, qs), results(approx, qs))]
    assert np.mean(overlap) >= (0.95 if kind == "hnsw" else 0.6)
    assert all(r[0][0] == f"c{i}" for r, i in zip(results(approx, qs), range(0, 600, 37)))  # itself comes first


@pytest.mark.parametrize("kind", KINDS)
def test_add_then_delete_restores_results(kind):
    if kind in ("hnsw", "ivfpq"):
        pytest.importorskip("faiss")
    index, _, vecs = make(kind)
    qs = [query(vecs[i]) for i in (0, 5, 9)]
    before = results(index, qs)
    extra, evecs = corpus(20, 16, seed=1)
    for c in extra:
        c.id, c.text = "new-" + c.id, "apple banana apple"
    evecs[:3] = vecs[[0, 5, 9]]  # near copies of the queries: they must show up
    evecs[:3] += 0.01
    evecs /= np.linalg.norm(evecs, axis=1, keepdims=True)
    index.add(extra, evecs)
    assert len(index) == 320 and results(index, qs) != before
    assert index.delete([c.id for c in extra] + ["no-such-id"]) == 20
    assert len(index) == 300 and results(index, qs) == before
    index.delete(["c0"])
    assert all(cid != "c0" for r in results(index, qs) for cid, _ in r)
    with pytest.raises(DataError, match="chunk id 'c1' is already in the index"):
        index.add(corpus(2, 16)[0], corpus(2, 16)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_filters(kind):
    if kind in ("hnsw", "ivfpq"):
        pytest.importorskip("faiss")
    index, _, vecs = make(kind)
    qs = [query(vecs[i]) for i in (1, 2)]
    for where, ok in [({"lang": "en"}, lambda c: c.metadata["lang"] == "en"),
                      ({"source": ["src0.md", "src2.md"]}, lambda c: c.source != "src1.md"),
                      ({"doc_id": "doc3"}, lambda c: c.doc_id == "doc3"),
                      (lambda c: c.id.endswith("7"), lambda c: c.id.endswith("7"))]:
        for q in qs:
            hits = index.search(q, 5, where)
            assert hits and all(ok(h.chunk) for h in hits)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
    if kind in ("hnsw", "ivfpq"):
        pytest.importorskip("faiss")
    index, _, vecs = make(kind)
    index.delete(["c3", "c4"])
    index.save(tmp_path / "a")
    loaded = load_index(tmp_path / "a")
    loaded.save(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    qs = [query(vecs[i]) for i in (0, 11, 42)]
    assert results(loaded, qs, 10) == results(index, qs, 10)
    assert type(loaded) is type(index) and len(loaded) == len(index) == 298


def test_corrupt_or_foreign_index_is_one_line(tmp_path):
    index, _, _ = make("exact", 20)
    index.save(tmp_path / "i")
    data = bytearray((tmp_path / "i" / "vectors.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "i" / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"vectors.npy: corrupt \(its checksum differs"):
        load_index(tmp_path / "i")
    (tmp_path / "i" / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="corrupt index manifest"):
        load_index(tmp_path / "i")
    with pytest.raises(DataError, match="not an lmstack rag index"):
        load_index(tmp_path)


def test_another_embedders_query_is_refused():
    index, _, vecs = make("exact", 20)
    with pytest.raises(ConfigError, match="embedded with 'emb-b' but this index was built with 'emb-a'"):
        index.search(query(vecs[0], "emb-b"), 3)
    with pytest.raises(ConfigError, match="embedded with 'emb-b'"):
        index.add(corpus(1)[0], corpus(1)[1], embedder_id="emb-b")
    with pytest.raises(ConfigError, match="embed the query first"):
        index.search("text only", 3)
    with pytest.raises(ConfigError, match=r"expected shape \(1, 16\)"):
        index.add([Chunk("fresh", "d", "s", 0, 1, "t")], np.zeros((1, 8)))


def test_ivfpq_with_too_few_vectors_says_what_to_do():
    pytest.importorskip("faiss")
    index = DenseIndex("e", 16, "ivfpq")
    with pytest.raises(ConfigError, match="needs at least 256 vectors"):
        index.add(*corpus(10))


def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch):
    index, _, _ = make("exact", 20)
    index.save(tmp_path / "i")
    bigger, _, _ = make("exact", 30)

    def boom(folder):
        (folder / "chunks.jsonl").write_text("partial", encoding="utf-8")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bigger, "_write", boom)
    with pytest.raises(RuntimeError):
        bigger.save(tmp_path / "i")
    assert len(load_index(tmp_path / "i")) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["i"]


KILLED = """
import sys, time
import numpy as np
from lmstack.rag import DenseIndex, Chunk
from pathlib import Path
index = DenseIndex("e", 4)
index.add([Chunk(f"c{i}", "d", "s", 0, 1, "t") for i in range(50)], np.eye(50, 4, dtype=np.float32))
orig = index._write
def slow(folder):
    out = orig(folder)
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)
    return out
index._write = slow
index.save(sys.argv[1])
"""


def test_a_killed_save_leaves_the_previous_index(tmp_path):
    index, _, _ = make("exact", 20)
    index.save(tmp_path / "i")
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "i"), str(marker)], env=env)
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never reached the middle of its save"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(load_index(tmp_path / "i")) == 20  # the old index, whole


def test_where_matches_fields_metadata_and_headings():
    from lmstack.rag.index import matches

    c = Chunk("a#0", "a", "x.md", 0, 3, "abc", ("Guide", "Install"), "T", {"lang": "en"})
    assert matches(c, {"doc_id": "a", "lang": "en"}) and matches(c, {"source": ["y.md", "x.md"]})
    assert matches(c, {"heading": "Install"}) and matches(c, {"heading": ["Guide", "Install"]})
    assert not matches(c, {"heading": "Usage"}) and not matches(c, {"lang": "de"}) and not matches(c, {"nokey": 1})


def test_a_missing_faiss_names_the_extra(monkeypatch):
    from lmstack import extras
    from lmstack.extras import MissingExtraError

    real = extras.importlib.import_module

    def fake(name, *a):
        if name.split(".")[0] == "faiss":
            raise ModuleNotFoundError("No module named 'faiss'", name="faiss")
        return real(name, *a)

    monkeypatch.setattr(extras.importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r'pip install "lmstack\[rag\]"'):
        DenseIndex("e", 4, "hnsw").add(*corpus(3, 4))
