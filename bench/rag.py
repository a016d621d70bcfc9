"""Benchmark: retrieval on SQuAD v1.1 dev, BM25 against rank_bm25, FAISS HNSW against exact search.

SQuAD v1.1 dev (``../shared/data/rag/squad_dev-v1.1.json``): all 2,067 paragraphs are the documents (one
chunk each); each question's relevant document is its own paragraph. Retrievers: BM25 (``lmstack.rag``'s
tokeniser, k1=1.5, b=0.75), dense (all-MiniLM-L6-v2, exact inner product), hybrid (reciprocal-rank fusion,
k=60, of the top 100 of each) and hybrid+MMR (the RRF top 50 re-ordered by MMR, lambda 0.7), and
hybrid with weighted min-max score fusion (0.5/0.5). Reported:
recall@1/5/20 and MRR, index build time (dense: embedding the paragraphs included) and queries/s (dense:
embedding the question included).

Reranking (skip with ``--skip-rerank``): the articles are split by :func:`lmstack.rag.squad.split_articles`
(half held out, seed 0); a cross-encoder (all-MiniLM-L6-v2 + a scalar head, :mod:`lmstack.rag.rerank`) is
trained on ``--train-queries`` questions of the training articles with hard negatives mined by BM25 and dense
over the training articles' paragraphs; then every retriever above, the reranked top ``--rerank-depth`` of
hybrid (RRF), hybrid (weighted) and BM25, and those fused with the first stage's scores, are scored on the same
seeded sample of ``--rerank-questions`` held-out questions; with the training time and the rerank pairs/s.

BM25 peer: ``rank_bm25.BM25Okapi`` on the same tokens: build time, queries/s (scores + top 20), and whether
its scores equal ours (bit for bit) on the measured questions.

FAISS: ``--vectors`` random 384-d unit vectors (default 100,000; ``--vectors 1000000`` for the 1M figure),
1,000 random unit queries from the same distribution, for two distributions: ``uniform`` on the sphere (the
hardest case: in 384 dimensions all similarities crowd together and the top 10 are near-ties) and
``lowrank`` (vectors in a random 32-dimensional subspace, closer to real embeddings); HNSW (M=32, efConstruction=200) recall@10 against exact search at several
efSearch values, single-query latency, build time, and the exact search latency (one matrix product).

    .venv/bin/python bench/rag.py                          # all 10,570 questions
    .venv/bin/python bench/rag.py --questions 2000         # the first 2,000 questions (in file order)
    .venv/bin/python bench/rag.py --skip-faiss --embed-cache /tmp/emb   # SQuAD + reranking, embeddings cached
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lmstack.rag import BM25Index, DenseIndex, HybridIndex, Query, WholeChunker, chunk_documents
from lmstack.rag.bm25 import tokenize
from lmstack.rag.retrieve import evaluate_hits, mmr_rerank, search_all
from lmstack.rag.squad import load_squad, questions_in, split_articles

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "rag" / "squad_dev-v1.1.json"


def row(name: str, metrics: dict[str, float], build_s: float | str, qps: float) -> str:
    build = build_s if isinstance(build_s, str) else f"{build_s:.1f}"
    rate = f"{qps:,.0f}" if qps >= 10 else f"{qps:.2f}"     # a reranker runs at ~1 query/s on 2 cores
    return (f"| {name} | {metrics['recall@1']:.4f} | {metrics['recall@5']:.4f} | {metrics['recall@20']:.4f} | "
            f"{metrics['mrr']:.4f} | {build} | {rate} |")


def bench_squad(args: argparse.Namespace) -> list[str]:
    from lmstack.rag.embed import Embedder

    docs, questions = load_squad(args.squad)
    if args.questions:
        questions = questions[:args.questions]
    chunks = chunk_documents(docs, WholeChunker())
    ks = (1, 5, 20)
    lines = [f"SQuAD v1.1 dev: {len(docs):,} paragraphs, {len(questions):,} questions"
             + (" (the first ones, file order)" if args.questions else "") + ".", "",
             "| retriever | recall@1 | recall@5 | recall@20 | MRR | index build s | queries/s |",
             "|---|---|---|---|---|---|---|"]

    t = time.perf_counter()
    bm25 = BM25Index()
    bm25.add(chunks)
    bm25.engine  # noqa: B018 - build the term-document matrix now, inside the timing
    bm25_build = time.perf_counter() - t
    queries = [Query(q.question) for q in questions]
    t = time.perf_counter()
    bm25_hits = search_all(bm25, queries, 20)
    bm25_qps = len(queries) / (time.perf_counter() - t)
    bm25_m = evaluate_hits(bm25_hits, questions, ks)
    lines.append(row("BM25", bm25_m, bm25_build, bm25_qps))
    print(lines[-1], file=sys.stderr, flush=True)

    emb = Embedder(batch_size=args.batch_size, device=args.device, cache_dir=args.embed_cache)
    t = time.perf_counter()
    vecs = emb.embed_documents([c.text for c in chunks])
    dense = DenseIndex(emb.id, emb.dim, embedder=emb.spec())
    dense.add(chunks, vecs, embedder_id=emb.id)
    dense_build = time.perf_counter() - t
    t = time.perf_counter()
    dq = emb.queries([q.question for q in questions])
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    dense_hits = search_all(dense, dq, 20)
    search_s = time.perf_counter() - t
    dense_m = evaluate_hits(dense_hits, questions, ks)
    lines.append(row("dense (MiniLM, exact)", dense_m, dense_build, len(dq) / (embed_s + search_s)))
    print(lines[-1], file=sys.stderr, flush=True)

    hybrid = HybridIndex(bm25, dense)
    t = time.perf_counter()
    hy_hits = [hybrid.search(q, 50) for q in dq]
    hy_s = time.perf_counter() - t
    hy_m = evaluate_hits(hy_hits, questions, ks)
    lines.append(row("hybrid (RRF k=60)", hy_m, bm25_build + dense_build, len(dq) / (embed_s + hy_s)))
    weighted = HybridIndex(bm25, dense, fusion="weighted")
    t = time.perf_counter()
    w_hits = [weighted.search(q, 20) for q in dq]
    w_s = time.perf_counter() - t
    lines.append(row("hybrid (weighted min-max 0.5/0.5)", evaluate_hits(w_hits, questions, ks),
                     bm25_build + dense_build, len(dq) / (embed_s + w_s)))
    t = time.perf_counter()
    mmr_hits = [mmr_rerank(hybrid, q, h, args.mmr_lambda) for q, h in zip(dq, hy_hits)]
    mmr_s = time.perf_counter() - t
    mmr_m = evaluate_hits(mmr_hits, questions, ks)
    lines.append(row(f"hybrid + MMR (lambda {args.mmr_lambda})", mmr_m, bm25_build + dense_build,
                     len(dq) / (embed_s + hy_s + mmr_s)))
    lines += ["", f"Dense: embedding the {len(chunks):,} paragraphs took {dense_build:.1f} s, the questions "
              f"{embed_s:.1f} s ({len(dq) / embed_s:,.0f}/s), exact search {len(dq) / search_s:,.0f} queries/s; "
              f"{emb.truncated} inputs were longer than the {emb.max_length}-token window (truncated). Device: "
              f"{args.device}."]
    if not args.skip_rerank:
        rows = {"BM25": (bm25_hits, bm25_m, bm25_build, bm25_qps),
                "dense (MiniLM, exact)": (dense_hits, dense_m, dense_build, len(dq) / (embed_s + search_s)),
                "hybrid (RRF k=60)": (hy_hits, hy_m, bm25_build + dense_build, len(dq) / (embed_s + hy_s)),
                "hybrid (weighted min-max 0.5/0.5)": (w_hits, None, bm25_build + dense_build,
                                                      len(dq) / (embed_s + w_s)),
                f"hybrid + MMR (lambda {args.mmr_lambda})": (mmr_hits, None, bm25_build + dense_build,
                                                              len(dq) / (embed_s + hy_s + mmr_s))}
        lines += [""] + bench_rerank(args, docs, questions, hybrid, dq, rows,
                                     {"bm25": len(dq) / bm25_qps, "hybrid": embed_s + hy_s})

    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        lines += ["", "rank_bm25 not installed: no BM25 peer row."]
        return lines
    corpus = [tokenize(c.text) for c in chunks]
    t = time.perf_counter()
    ref = BM25Okapi(corpus)
    ref_build = time.perf_counter() - t
    n = min(args.peer_questions, len(questions))
    qtoks = [tokenize(q.question) for q in questions[:n]]
    t = time.perf_counter()
    ref_scores = [ref.get_scores(q) for q in qtoks]
    _ = [np.argsort(-s, kind="stable")[:20] for s in ref_scores]
    ref_qps = n / (time.perf_counter() - t)
    t = time.perf_counter()
    ours = [bm25.engine.top_k(q, 20) for q in qtoks]
    ours_qps = n / (time.perf_counter() - t)
    equal = all(np.array_equal(bm25.engine.scores(q), s) for q, s in zip(qtoks, ref_scores))
    del ours
    lines += ["", f"BM25 against rank_bm25 {getattr(sys.modules['rank_bm25'], '__version__', '0.2.2')} on the same "
              f"tokens, {n:,} questions:", "",
              "| engine | build s | queries/s (scores + top 20) | scores equal to rank_bm25 |", "|---|---|---|---|",
              f"| lmstack.rag BM25 (sparse postings) | {bm25_build:.2f} | {ours_qps:,.0f} | {'yes, bit for bit' if equal else 'NO'} |",
              f"| rank_bm25.BM25Okapi | {ref_build:.2f} | {ref_qps:,.0f} | - |",
              f"| speed-up | | {ours_qps / ref_qps:.0f}x | |"]
    return lines


def bench_rerank(args: argparse.Namespace, docs, questions, hybrid, dq, rows, first_stage_s) -> list[str]:
    """Train a cross-encoder on the training articles, rerank on a sample of the held-out articles' questions.

    The article split is :func:`lmstack.rag.squad.split_articles` (the one rule training uses). Training
    questions are a seeded sample of the training articles' questions; their hard negatives come from BM25
    and dense restricted to the training articles' paragraphs, so nothing of a held-out article is seen in
    training. Every row of the table is scored on the same seeded sample of held-out questions (drawn with
    its own generator, so it does not depend on the training sample's size). Reranked rows: the first
    stage's top ``--rerank-depth`` ordered by the cross-encoder alone, and fused with the first stage's
    scores (``fuse_with_first_stage``, weight ``--fuse-weight`` on the reranker; chosen beforehand on
    training-article questions, never on the held-out ones).
    """
    import random

    from lmstack.rag.rerank import (
        RerankTrainConfig,
        fuse_with_first_stage,
        reorder,
        train_cross_encoder,
        training_examples,
    )

    train_titles, eval_titles = split_articles({d.title for d in docs}, args.eval_fraction, args.split_seed)
    qindex = {id(q): i for i, q in enumerate(questions)}
    train_q = [qindex[id(q)] for q in questions_in(questions, docs, train_titles)]
    eval_q = [qindex[id(q)] for q in questions_in(questions, docs, eval_titles)]
    train_pick = sorted(random.Random(args.split_seed).sample(train_q, min(args.train_queries, len(train_q))))
    eval_pick = sorted(random.Random(args.split_seed + 1).sample(eval_q, min(args.rerank_questions, len(eval_q))))

    t = time.perf_counter()
    examples, stats = training_examples(hybrid, [dq[i] for i in train_pick], [questions[i] for i in train_pick],
                                        args.negatives, depth=30, where={"title": set(train_titles)})
    mine_s = time.perf_counter() - t
    cfg = RerankTrainConfig(out=str(Path(args.reranker_out)), loss=args.loss, batch_queries=args.batch_queries,
                            lr=args.lr, max_length=args.max_length, seed=0, device=args.device,
                            freeze_embeddings=True, train_top_layers=args.train_top_layers, epochs=args.epochs)
    t = time.perf_counter()
    ce, result = train_cross_encoder(examples, cfg)
    train_s = time.perf_counter() - t

    # every (question, passage) pair the reranked rows need is scored once; a row's time is its pairs at the
    # measured pairs/s plus its first stage's share
    depth = args.rerank_depth
    sub = [questions[i] for i in eval_pick]
    cache: dict[tuple[int, str], float] = {}
    spent, scored = 0.0, 0
    reranked_rows = []
    firsts = (("hybrid (RRF k=60)", "hybrid (RRF)", "hybrid"), ("hybrid (weighted min-max 0.5/0.5)",
              "hybrid (weighted)", "hybrid"), ("BM25", "BM25", "bm25"))
    for name, short, first in firsts:
        lists = [rows[name][0][i][:depth] for i in eval_pick]
        todo = sorted({(qi, h.chunk.id): (questions[qi].question, h.chunk.text)
                       for qi, hl in zip(eval_pick, lists) for h in hl if (qi, h.chunk.id) not in cache}.items())
        t = time.perf_counter()
        scores = ce.score_pairs([q for _, (q, _) in todo], [p for _, (_, p) in todo]) if todo else []
        spent += time.perf_counter() - t
        scored += len(todo)
        cache.update({key: float(x) for (key, _), x in zip(todo, scores)})
        reranked = [reorder(hl, [cache[(qi, h.chunk.id)] for h in hl]) for qi, hl in zip(eval_pick, lists)]
        fused = [fuse_with_first_stage(hl, r, args.fuse_weight) for hl, r in zip(lists, reranked)]
        n_pairs = sum(len(hl) for hl in lists)
        reranked_rows.append((short, first, reranked, fused, n_pairs))
    pairs_s = scored / spent

    lines = [f"Reranking (cross-encoder on all-MiniLM-L6-v2, {args.loss} loss) on the held-out articles: "
             f"{len(eval_titles)} of {len(train_titles) + len(eval_titles)} articles "
             f"(`split_articles(eval_fraction={args.eval_fraction}, seed={args.split_seed})`), a seeded sample of "
             f"{len(eval_pick):,} of their {len(eval_q):,} questions; every row on that sample. A reranker "
             f"re-orders the first stage's top {depth}, so its recall@20 is the first stage's; \"fused\" = "
             f"`fuse_with_first_stage(weight={args.fuse_weight})` (min-max fusion of the first stage's and the "
             f"reranker's scores).", "",
             "| retriever | recall@1 | recall@5 | recall@20 | MRR | index build s | queries/s |",
             "|---|---|---|---|---|---|---|"]
    for name, (hits, _, build, qps) in rows.items():
        lines.append(row(name, evaluate_hits([hits[i] for i in eval_pick], sub, (1, 5, 20)), build, qps))
    for short, first, reranked, fused, n_pairs in reranked_rows:
        row_s = n_pairs / pairs_s + first_stage_s[first] * len(eval_pick) / len(questions)
        for label, hits in ((f"{short} + rerank", reranked), (f"{short} + rerank, fused", fused)):
            lines.append(row(label, evaluate_hits(hits, sub, (1, 5, 20)), f"+ train {train_s:.0f}",
                             len(eval_pick) / row_s))
            print(lines[-1], file=sys.stderr, flush=True)
    layers = f"the top {args.train_top_layers} blocks, pooler and head trained" if args.train_top_layers else \
        "every block trained, embeddings frozen"
    lines += ["", f"Training: {result['examples']:,} queries of the training articles (a seeded sample of "
              f"{len(train_pick):,}; {stats['no_positive'] + stats['few_negatives']} skipped, "
              f"{result['valid_examples']} kept aside for the held-out loss), each with its paragraph and "
              f"{result['negatives']} hard negatives mined from BM25 and dense top 30 over the training articles' "
              f"paragraphs ({mine_s:.1f} s); {result['steps']} steps of {args.batch_queries} queries x "
              f"{result['negatives'] + 1} passages, lr {args.lr:g}, max length {args.max_length}, {result['dtype']}, "
              f"{layers}; {train_s:.0f} s in all. Logged training loss (one batch) {result['first_logged_loss']:.3f} "
              f"-> {result['last_logged_loss']:.3f}; on the {result['valid_examples']} held-out training queries "
              f"{result['before']['val_loss']:.3f} -> {result['after']['val_loss']:.3f} "
              f"(chance ln({result['negatives'] + 1}) = {math.log(result['negatives'] + 1):.3f}), top-1 accuracy "
              f"among the {result['negatives'] + 1} {result['before']['val_accuracy']:.3f} -> "
              f"{result['after']['val_accuracy']:.3f}.",
              f"Rerank speed: {pairs_s:,.1f} pairs/s = {pairs_s / depth:,.2f} queries/s at depth {depth} "
              f"(batch {ce.batch_size}, {result['dtype']}; {scored:,} distinct pairs scored); {ce.truncated:,} pairs "
              f"(training included) were cut to {args.max_length} tokens."]
    return lines


def random_vectors(rng: np.random.Generator, n: int, d: int, kind: str, basis: np.ndarray | None) -> np.ndarray:
    """Unit vectors: ``uniform`` on the sphere, or ``lowrank`` (a random ``intrinsic``-dim subspace of R^d)."""
    if kind == "uniform":
        x = rng.standard_normal((n, d), dtype=np.float32)
    else:
        x = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_faiss(args: argparse.Namespace, kind: str) -> list[str]:
    import faiss

    rng = np.random.default_rng(0)
    d, n, nq = 384, args.vectors, 1000
    basis = rng.standard_normal((args.intrinsic_dim, d), dtype=np.float32) if kind == "lowrank" else None
    xb = random_vectors(rng, n, d, kind, basis)
    xq = random_vectors(rng, nq, d, kind, basis)
    t = time.perf_counter()
    truth = np.empty((nq, 10), dtype=np.int64)
    for start in range(0, nq, 100):       # blocks of 100 queries: at 1M vectors all 1,000 at once is 4 GB
        scores = xq[start:start + 100] @ xb.T
        truth[start:start + 100] = np.argpartition(-scores, 10, axis=1)[:, :10]
    exact_batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(100):
        s = xb @ xq[i]
        np.argpartition(-s, 10)[:10]
    exact_ms = (time.perf_counter() - t) / 100 * 1000
    del scores
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.ef_construction
    index.add(xb)
    build_s = time.perf_counter() - t
    what = ("uniform on the sphere" if kind == "uniform" else
            f"spanning a random {args.intrinsic_dim}-dimensional subspace, as embeddings have a low intrinsic dimension")
    lines = [f"FAISS {faiss.__version__} HNSW (M={args.hnsw_m}, efConstruction={args.ef_construction}) on {n:,} random 384-d unit vectors ({what}), "
             f"{nq:,} random unit queries from the same distribution; build {build_s:.1f} s ({faiss.omp_get_max_threads()} threads). Exact "
             f"search (numpy, one matrix product): {exact_ms:.2f} ms per query, {exact_batch_s:.2f} s for all "
             f"{nq:,} as one batch.", "",
             "| efSearch | recall@10 vs exact | ms/query (one at a time) | queries/s (batch) |", "|---|---|---|---|"]
    for ef in args.ef:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        t = time.perf_counter()
        _, found = index.search(xq, 10, params=params)
        batch_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(200):
            index.search(xq[i:i + 1], 10, params=params)
        one_ms = (time.perf_counter() - t) / 200 * 1000
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        lines.append(f"| {ef} | {recall:.4f} | {one_ms:.3f} | {nq / batch_s:,.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--questions", type=int, default=0, help="use the first N questions (0 = all 10,570)")
    ap.add_argument("--peer-questions", type=int, default=2000, help="questions for the rank_bm25 comparison")
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--faiss-data", nargs="+", choices=["uniform", "lowrank"], default=["uniform", "lowrank"])
    ap.add_argument("--intrinsic-dim", type=int, default=32, help="lowrank: the dimension of the subspace")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mmr-lambda", type=float, default=0.7)
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--skip-squad", action="store_true")
    ap.add_argument("--skip-rerank", action="store_true")
    ap.add_argument("--embed-cache", default=None, help="embedding cache folder (default: none, a cold run)")
    ap.add_argument("--eval-fraction", type=float, default=0.5, help="share of articles held out for reranking")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--train-queries", type=int, default=800, help="training-article questions to train on")
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--batch-queries", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train-top-layers", type=int, default=3, help="0 = train every block")
    ap.add_argument("--fuse-weight", type=float, default=0.3, help="the reranker's weight in the fused rows")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--loss", choices=["listwise", "pointwise"], default="listwise")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--rerank-questions", type=int, default=300, help="held-out questions the table is scored on")
    ap.add_argument("--rerank-depth", type=int, default=20)
    ap.add_argument("--reranker-out", default="runs/bench_reranker")
    args = ap.parse_args()
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; command: `{' '.join(['bench/rag.py', *sys.argv[1:]])}`", ""]
    if not args.skip_squad:
        if not args.squad.is_file():
            sys.exit(f"error: {args.squad}: SQuAD v1.1 dev not found (see ../shared/data/README.md)")
        lines += bench_squad(args) + [""]
    if not args.skip_faiss:
        for kind in args.faiss_data:
            lines += bench_faiss(args, kind) + [""]
    print("\n".join(lines))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
