"""``lmstack rag index|query|eval``: build a retrieval index from documents, query it, measure it.

Thin: parse arguments, call :mod:`lmstack.rag.retrieve`; heavy modules (torch, faiss) load inside handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmstack.errors import ConfigError


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,5,20, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"every k must be >= 1, got {text!r}")
    return ks


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    p = subparsers.add_parser("rag", help="retrieval: index documents (BM25, dense, hybrid), query, evaluate",
                              description="Retrieval for RAG: chunk documents, embed them with an encoder "
                                          "(all-MiniLM-L6-v2 by default), index them, retrieve, measure. "
                                          "See docs/rag.md.",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="rag_command", metavar="COMMAND")

    ix = sub.add_parser("index", help="build an index from documents", formatter_class=HelpFormatter,
                        description="Load DOCS (text, Markdown, HTML, JSONL/JSON/Parquet rows, PDF; files, folders, "
                                    "globs), chunk them and write an index folder (atomically: a killed run leaves "
                                    "the previous index). Embeddings are cached beside the index, so a re-run "
                                    "after an interruption embeds only what is missing.",
                        epilog="examples:\n  lmstack rag index docs/ --out runs/docs.index --retriever hybrid\n"
                               "  lmstack rag index rows.jsonl --out idx --retriever bm25 --chunker none")
    ix.add_argument("docs", nargs="+", metavar="DOCS", help="files, folders or globs")
    ix.add_argument("--out", required=True, help="the index folder to write")
    ix.add_argument("--retriever", choices=["bm25", "dense", "hybrid"], default="hybrid")
    ix.add_argument("--chunker", choices=["recursive", "sentence", "tokens", "semantic", "parent", "none"],
                    default="recursive",
                    help="recursive/sentence/semantic: --chunk-size in characters; tokens: in words; parent: "
                         "sentence chunks of --chunk-size (default 400) indexed, their 4x larger recursive "
                         "section returned by `query --parents`; none: whole documents")
    ix.add_argument("--chunk-size", type=int_at_least(1), default=None,
                    help="default 1000 characters (recursive, sentence, semantic) or 256 words (tokens)")
    ix.add_argument("--overlap", type=int_at_least(0), default=None,
                    help="tokens: words shared by neighbours (default 32); sentence: sentences (default 0)")
    ix.add_argument("--backend", choices=["exact", "hnsw", "ivfpq"], default="exact", help="dense index kind")
    ix.add_argument("--embedder", default=None, help="an encoder folder (default: all-MiniLM-L6-v2)")
    ix.add_argument("--query-prefix", default="", help="text put before each query (E5: 'query: ')")
    ix.add_argument("--document-prefix", default="", help="text put before each chunk (E5: 'passage: ')")
    ix.add_argument("--batch-size", type=int_at_least(1), default=64)
    ix.add_argument("--device", default="cpu", help="torch device for the embedder")
    ix.add_argument("--cache", default=None, help="embedding cache folder (default: .<out>.embcache beside it)")
    ix.add_argument("--text-field", default="text", help="the text field of JSONL/JSON/Parquet rows")
    ix.add_argument("--id-field", default="id", help="the document-id field of rows (default: file:line)")
    ix.add_argument("--stopwords", action="store_true", help="BM25: drop a short English stopword list")
    ix.set_defaults(func=cmd_index)

    q = sub.add_parser("query", help="retrieve the chunks for a question", formatter_class=HelpFormatter,
                       epilog='example:\n  lmstack rag query runs/docs.index "how is the cache keyed?" --k 5')
    q.add_argument("index", metavar="INDEX")
    q.add_argument("question")
    q.add_argument("--k", type=int_at_least(1), default=5)
    q.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only chunks whose doc_id/source/title/metadata KEY equals VALUE (repeatable)")
    q.add_argument("--parents", action="store_true",
                   help="return each hit's enclosing section (an index built with --chunker parent)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--json", action="store_true")
    q.add_argument("--model", default=None, metavar="RUN",
                   help="answer with this model (a run or model folder): a cited answer from the numbered hits, "
                        "each sentence verified against the source it cites, or \"I don't know\" with the reason")
    q.add_argument("--judge", default=None, metavar="LLM",
                   help="with --model: an LLM (run folder, or http(s)://host/v1#model) asked whether a sentence the "
                        "span match rejects is supported by its cited source")
    q.add_argument("--min-score", type=float, default=0.0,
                   help="with --model: abstain without generating when the best hit scores below this")
    q.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    q.add_argument("--flag-unsupported", action="store_true",
                   help="with --model: keep unsupported sentences (flagged) instead of dropping them")
    _rerank_options(q)
    q.set_defaults(func=cmd_query)

    e = sub.add_parser("eval", help="retrieval metrics on questions with known relevant documents",
                       formatter_class=HelpFormatter,
                       description="QUESTIONS is JSONL/JSON rows {\"question\": ..., \"relevant\": [doc ids or "
                                   "source paths]}. Prints recall@k, hit_rate@k, precision@k, mrr, map and "
                                   "ndcg@10 per retriever (a hybrid index also reports its bm25 and dense parts).",
                       epilog="example:\n  lmstack rag eval runs/docs.index questions.jsonl --k 1,5,20 --json")
    e.add_argument("index", metavar="INDEX")
    e.add_argument("questions", metavar="QUESTIONS.jsonl")
    e.add_argument("--k", type=_ks, default=[1, 5, 20], help="cut-offs, comma-separated")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    _rerank_options(e)
    e.set_defaults(func=cmd_eval)
    _register_train_reranker(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_index(args: argparse.Namespace) -> int:
    from lmstack.rag.bm25 import ENGLISH_STOPWORDS
    from lmstack.rag.chunk import make_chunker
    from lmstack.rag.documents import load_documents
    from lmstack.rag.retrieve import build_index
    from lmstack.runs import Progress

    embedder = None
    if args.retriever != "bm25" or args.chunker == "semantic":
        from lmstack.rag.embed import Embedder

        out = Path(args.out)
        cache = args.cache or out.with_name(f".{out.name}.embcache")
        embedder = Embedder(args.embedder, args.batch_size, args.query_prefix, args.document_prefix,
                            cache_dir=cache, device=args.device)
    chunker = make_chunker(args.chunker, args.chunk_size, args.overlap,
                           embed=embedder.embed_documents if embedder is not None else None)
    docs, report = load_documents(args.docs, text_field=args.text_field, id_field=args.id_field)
    print(f"loaded {report.summary()}", file=sys.stderr)
    stop = sorted(ENGLISH_STOPWORDS) if args.stopwords else ()
    dense = args.retriever != "bm25"
    n_chunks = sum(len(chunker.chunk(d)) for d in docs) if dense else 0
    with Progress(n_chunks, "embedding", "chunks", disable=not dense) as bar:
        index, chunks = build_index(docs, args.retriever, chunker, embedder if dense else None, args.backend,
                                    bar.update, stop)
    index.save(args.out)
    note = ""
    if dense and embedder.truncated:
        note = (f"; {embedder.truncated} chunks longer than the {embedder.max_length}-token window were "
                f"truncated (use a smaller --chunk-size)")
    print(f"indexed {len(docs)} documents as {len(chunks)} chunks ({args.retriever}) -> {args.out}{note}")
    return 0


def _where(items: list[str]) -> dict[str, str] | None:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {item!r}: expected KEY=VALUE")
        out[key] = value
    return out or None


def cmd_query(args: argparse.Namespace) -> int:
    from lmstack.rag.index import load_index
    from lmstack.rag.retrieve import embedder_for, make_queries

    if not args.question.strip():
        raise ConfigError("question: empty; give the text to search for")
    model = None
    if args.model is not None:
        from lmstack.infer.text import load_run

        model = load_run(args.model, device=args.device)  # a missing or damaged run: one line, before the index
    elif args.judge is not None:
        raise ConfigError("--judge: checks a generated answer; give --model RUN as well")
    index = load_index(args.index)
    embedder = embedder_for(index, device=args.device)
    query = make_queries(index, embedder, [args.question])[0]
    want = 4 * args.k if args.parents else args.k  # several children of one section may rank high: fetch more
    if args.rerank or args.rerank_llm:
        hits = _reranked(args, [args.question], [index.search(query, max(want, args.rerank_depth),
                                                                 _where(args.where))])[0][:want]
    else:
        hits = index.search(query, want, _where(args.where))
    if args.parents:
        from lmstack.rag.chunk import parent_hits

        hits = parent_hits(hits)[:args.k]
    if model is not None:
        return _print_answer(args, hits, model)
    if args.json:
        print(json.dumps([{"score": h.score, **h.chunk.to_json()} for h in hits], ensure_ascii=False, indent=2))
    else:
        if embedder is not None and embedder.truncated:
            print(f"note: the question is longer than the {embedder.max_length}-token window; only its start "
                  f"was embedded", file=sys.stderr)
        if not hits:
            print("no matching chunk")
        for rank, h in enumerate(hits, 1):
            c = h.chunk
            where = f"{c.source}:{c.start}-{c.end}" + (f" ({' > '.join(c.heading)})" if c.heading else "")
            text = " ".join(c.text.split())
            print(f"[{rank}] {h.score:.4f}  {where}\n    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def _print_answer(args: argparse.Namespace, hits: list, loaded: tuple) -> int:
    from dataclasses import asdict

    from lmstack.rag.answer import GenerateConfig, generate_answer

    judge = None
    if args.judge is not None:
        from lmstack.eval.llm import load_llm

        judge = load_llm(args.judge)
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, min_score=args.min_score,
                         unsupported="flag" if args.flag_unsupported else "drop")
    a = generate_answer(args.question, hits, *loaded, cfg, judge=judge)
    if args.json:
        print(json.dumps({"answer": a.text, "abstained": a.abstained, "reason": a.reason, "generated": a.generated,
                          "sources": [asdict(s) for s in a.sources], "checks": [asdict(c) for c in a.checks]},
                         ensure_ascii=False, indent=2))
        return 0
    print(a.text)
    if a.abstained:
        print(f"({a.reason})")
    for c in a.checks:
        if not c.supported:
            print(f"note: {'flagged' if args.flag_unsupported else 'dropped'} {c.sentence!r}: {c.why}",
                  file=sys.stderr)
    for s in a.sources:
        text = " ".join(s.text.split())
        print(f"[{s.n}] {s.score:.4f}  {s.source}:{s.start}-{s.end}\n    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmstack.rag.index import load_index
    from lmstack.rag.retrieve import embedder_for, evaluate_index, read_questions

    index = load_index(args.index)
    questions = read_questions(args.questions)
    reranker = _load_reranker(args) if args.rerank or args.rerank_llm else None
    result = evaluate_index(index, embedder_for(index, device=args.device), questions, args.k, reranker=reranker,
                            rerank_depth=args.rerank_depth)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    names = list(next(iter(result.values())))
    w = max([10, *(len(r) for r in result)])  # "hybrid+rerank" is wider than the column was
    print(f"{'retriever':{w}} " + " ".join(f"{n:>12}" for n in names))
    for retriever, metrics in result.items():
        print(f"{retriever:{w}} " + " ".join(f"{metrics[n]:12.4f}" for n in names))
    print(f"({len(questions)} questions)")
    return 0


# ------------------------------------------------------------------------------------------------- reranking

def _rerank_options(p: argparse.ArgumentParser) -> None:
    from lmstack.clihelp import int_at_least

    p.add_argument("--rerank", default=None, metavar="MODEL_DIR",
                   help="re-order the first stage's top --rerank-depth with a cross-encoder folder "
                        "(lmstack rag train-reranker)")
    p.add_argument("--rerank-llm", default=None, metavar="RUN",
                   help="re-order with a causal LM's pointwise relevance instead (logit yes - no; a run folder)")
    p.add_argument("--rerank-depth", type=int_at_least(1), default=20, help="hits the reranker re-orders")
    p.add_argument("--rerank-batch-size", type=int_at_least(1), default=32)


def _load_reranker(args: argparse.Namespace):
    from lmstack.rag.rerank import LLMRelevance, load_reranker

    if args.rerank and args.rerank_llm:
        raise ConfigError("--rerank and --rerank-llm: pick one reranker")
    if args.rerank_llm:
        return LLMRelevance.from_run(args.rerank_llm, device=args.device, batch_size=args.rerank_batch_size)
    return load_reranker(args.rerank, device=args.device, batch_size=args.rerank_batch_size)


def _reranked(args: argparse.Namespace, questions: list[str], hit_lists: list) -> list:
    from lmstack.rag.rerank import rerank_head

    reranker = _load_reranker(args)
    return [rerank_head(reranker, q, h, args.rerank_depth) for q, h in zip(questions, hit_lists)]


def _register_train_reranker(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    t = sub.add_parser("train-reranker", help="train a cross-encoder reranker on questions with hard negatives",
                       formatter_class=HelpFormatter,
                       description="QUESTIONS is JSONL/JSON rows {\"question\": ..., \"relevant\": [doc ids or source "
                                   "paths]}. Each question's positive is its relevant chunk; its hard negatives are "
                                   "the index's top --depth (BM25 and dense parts of a hybrid index) without it. "
                                   "The cross-encoder (all-MiniLM-L6-v2 with a scalar head by default) trains "
                                   "through the one trainer; OUT is a reranker folder for --rerank.",
                       epilog="example:\n  lmstack rag train-reranker runs/docs.index train_questions.jsonl "
                              "--out runs/reranker\n  lmstack rag eval runs/docs.index test_questions.jsonl "
                              "--rerank runs/reranker")
    t.add_argument("index", metavar="INDEX")
    t.add_argument("questions", metavar="QUESTIONS.jsonl")
    t.add_argument("--out", required=True, help="the reranker folder to write")
    t.add_argument("--base", default="", help="an encoder folder (default: all-MiniLM-L6-v2)")
    t.add_argument("--negatives", type=int_at_least(1), default=3, help="hard negatives per question")
    t.add_argument("--depth", type=int_at_least(1), default=30, help="first-stage hits negatives are mined from")
    t.add_argument("--loss", choices=["listwise", "pointwise"], default="listwise")
    t.add_argument("--batch-queries", type=int_at_least(1), default=8, help="questions per step")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--steps", type=int_at_least(0), default=0, help="0 = --epochs over the questions")
    t.add_argument("--lr", type=float, default=5e-5)
    t.add_argument("--max-length", type=int_at_least(8), default=192, help="tokens of query + passage")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    t.set_defaults(func=cmd_train_reranker)


def cmd_train_reranker(args: argparse.Namespace) -> int:
    from lmstack.rag.index import load_index
    from lmstack.rag.rerank import RerankTrainConfig, train_cross_encoder, training_examples
    from lmstack.rag.retrieve import embedder_for, make_queries, read_questions

    index = load_index(args.index)
    questions = read_questions(args.questions)
    queries = make_queries(index, embedder_for(index, device=args.device), [q.question for q in questions])
    examples, stats = training_examples(index, queries, questions, args.negatives, args.depth)
    print(f"{stats['examples']} training questions ({stats['no_positive']} without their relevant chunk in the "
          f"index, {stats['few_negatives']} with fewer than {args.negatives} negatives skipped)", file=sys.stderr)
    cfg = RerankTrainConfig(out=args.out, base=args.base, loss=args.loss, batch_queries=args.batch_queries,
                            epochs=args.epochs, steps=args.steps, lr=args.lr, max_length=args.max_length,
                            seed=args.seed, device=args.device, dtype=args.dtype)
    _, result = train_cross_encoder(examples, cfg)
    before, after = result["before"], result["after"]
    held = (f"; held-out loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}, top-1 accuracy "
            f"{before['val_accuracy']:.3f} -> {after['val_accuracy']:.3f}" if after else "")
    print(f"trained {result['steps']} steps on {result['examples']} questions in {result['train_seconds']:.0f} s"
          f"{held} -> {args.out}")
    return 0
