"""``lmstack embed ...``: static word vectors (word2vec, GloVe): train, query, evaluate (see lmstack.embed)."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  lmstack embed train corpus/ --method word2vec --dim 100 --out runs/w2v
  lmstack embed train 'data/*.jsonl' --method glove --dim 50 --window 10 --epochs 25 --out runs/glove
  lmstack embed neighbors runs/w2v king
  lmstack embed analogy runs/w2v man king woman          # man : king :: woman : ?
  lmstack embed eval runs/w2v                            # Google analogies + WordSim-353 (gensim's test data)"""


def register(subparsers: Any) -> None:
    from lmstack.clihelp import HelpFormatter

    embed = subparsers.add_parser("embed", help="static word vectors: word2vec and GloVe",
                                  description="Static word embeddings: train word2vec or GloVe, query, evaluate.",
                                  epilog=EPILOG, formatter_class=HelpFormatter)
    sub = embed.add_subparsers(dest="embed_command", metavar="SUBCOMMAND")
    tr = sub.add_parser("train", help="train word vectors into a folder", epilog=EPILOG, formatter_class=HelpFormatter,
                        description="Train word2vec or GloVe on text files, folders, globs or JSONL rows.")
    tr.add_argument("inputs", nargs="+", metavar="INPUTS", help="files, folders or globs (.txt, .md, .jsonl, ...)")
    tr.add_argument("--out", required=True, help="the run folder to write")
    tr.add_argument("--method", default="word2vec", help="word2vec or glove")
    tr.add_argument("--dim", type=int, default=100, help="vector size")
    tr.add_argument("--window", type=int, default=None, help="context words each side (word2vec 5, glove 10)")
    tr.add_argument("--epochs", type=int, default=None, help="passes over the text (word2vec 5, glove 25)")
    tr.add_argument("--min-count", type=int, default=5, help="drop words seen fewer times")
    tr.add_argument("--max-vocab", type=int, default=0, help="keep at most this many words (0: all)")
    tr.add_argument("--split", default="regex", help="regex | whitespace | tokenizer (words are its tokens)")
    tr.add_argument("--tokenizer", default="", help="tokenizer file/folder for --split tokenizer")
    tr.add_argument("--no-lowercase", action="store_true", help="keep the case of words")
    tr.add_argument("--text-field", default="text", help="the JSONL/Parquet field holding the text")
    tr.add_argument("--cbow", action="store_true", help="word2vec: CBOW instead of skip-gram")
    tr.add_argument("--negative", type=int, default=5, help="word2vec: noise words per positive")
    tr.add_argument("--sample", type=float, default=1e-3, help="word2vec: subsampling threshold (0: off)")
    tr.add_argument("--alpha", type=float, default=None, help="word2vec start learning rate (0.025) / glove lr (0.05)")
    tr.add_argument("--shared-negatives", action="store_true",
                    help="word2vec skip-gram: one set of noise words per window (faster, pWord2Vec)")
    tr.add_argument("--compile", action="store_true",
                    help="word2vec skip-gram per pair: torch.compile the update (about 2x faster, ~10 s to compile)")
    tr.add_argument("--workers", type=int, default=1, help="word2vec: processes sharing the vectors (Hogwild)")
    tr.add_argument("--threads", type=int, default=1, help="torch threads per process (0: all cores)")
    tr.add_argument("--seed", type=int, default=1)
    tr.add_argument("--formats", default="bin", help="word2vec files to write besides safetensors: bin,txt")
    tr.add_argument("--quiet", action="store_true", help="no progress lines")
    tr.set_defaults(func=_train)
    nb = sub.add_parser("neighbors", help="nearest words by cosine", formatter_class=HelpFormatter,
                        epilog="examples:\n  lmstack embed neighbors runs/w2v king\n"
                               "  lmstack embed neighbors vectors.bin module --topn 20",
                        description="The words closest to WORD by cosine similarity.")
    nb.add_argument("vectors", metavar="DIR", help="a folder from `embed train`, or a .bin/.txt/.vec file")
    nb.add_argument("word", metavar="WORD")
    nb.add_argument("--topn", type=int, default=10)
    nb.set_defaults(func=_neighbors)
    an = sub.add_parser("analogy", help="a is to b as c is to ?", formatter_class=HelpFormatter,
                        epilog="examples:\n  lmstack embed analogy runs/w2v man king woman  # man : king :: woman : ?\n"
                               "  lmstack embed analogy runs/w2v athens greece paris --method mul",
                        description="Answers to 'A is to B as C is to ?' (3CosAdd, or 3CosMul with --method mul).")
    an.add_argument("vectors", metavar="DIR")
    an.add_argument("a")
    an.add_argument("b")
    an.add_argument("c")
    an.add_argument("--topn", type=int, default=5)
    an.add_argument("--method", default="add", help="add (3CosAdd) or mul (3CosMul)")
    an.set_defaults(func=_analogy)
    ev = sub.add_parser("eval", help="Google analogy accuracy and WordSim-353 Spearman", formatter_class=HelpFormatter,
                        epilog="examples:\n  lmstack embed eval runs/w2v\n"
                               "  lmstack embed eval vectors.txt --analogies my_questions.txt --restrict-vocab 30000",
                        description="Analogy accuracy and WordSim-353 Spearman, in-vocabulary items only (gensim's "
                                    "rules and test data).")
    ev.add_argument("vectors", metavar="DIR")
    ev.add_argument("--restrict-vocab", type=int, default=300_000, help="only the most frequent words take part")
    ev.add_argument("--analogies", default=None, help="analogy file (default: gensim's questions-words.txt)")
    ev.add_argument("--pairs", default=None, help="word-pair file (default: gensim's wordsim353.tsv)")
    ev.set_defaults(func=_eval)
    embed.set_defaults(func=lambda args: (embed.print_help(), 2)[1])


def _train(args: argparse.Namespace) -> int:
    from lmstack.embed.config import GloVeConfig, VocabConfig, Word2VecConfig
    from lmstack.embed.run import train_run

    vocab = VocabConfig(split=args.split, tokenizer=args.tokenizer, lowercase=not args.no_lowercase,
                        min_count=args.min_count, max_vocab=args.max_vocab, text_field=args.text_field)
    w2v = glove = None
    if args.method == "glove":
        glove = GloVeConfig(dim=args.dim, window=args.window or 10, epochs=args.epochs or 25,
                            lr=args.alpha or 0.05, seed=args.seed, threads=args.threads)
    else:
        w2v = Word2VecConfig(dim=args.dim, sg=not args.cbow, window=args.window or 5, epochs=args.epochs or 5,
                             negative=args.negative, sample=args.sample, alpha=args.alpha or 0.025,
                             shared_negatives=args.shared_negatives, seed=args.seed, threads=args.threads,
                             workers=args.workers, compile=args.compile)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    _, s = train_run(args.inputs, args.out, args.method, vocab, w2v, glove, formats, progress=not args.quiet)
    line = (f"{s['method']}: {s['vocab_size']:,} words x {s['dim']} from {s['words']:,} words of text in "
            f"{s['seconds']:.1f} s ({s['words_per_s']:,.0f} words/s), loss {s['loss_first']:.4f} -> "
            f"{s['loss_last']:.4f}; wrote {args.out}")
    print(line)
    print(_eval_lines(s.get("eval", {})))
    return 0


def _eval_lines(r: dict) -> str:
    if not r or "skipped" in r:
        return f"evaluation skipped: {r.get('skipped', 'not run')}"
    a, m, w = r["analogy"], r["analogy_mul"], r["wordsim353"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    ws = "n/a" if w["spearman"] is None else f"{w['spearman']:.4f}"
    return (f"analogies (3CosAdd): {pct(a['accuracy'])} of {a['total']:,} in-vocabulary questions "
            f"({a['oov_ratio']:.1f}% skipped); 3CosMul: {pct(m['accuracy'])}\n"
            f"WordSim-353 Spearman: {ws} on {w['pairs']} pairs ({w['oov_ratio']:.1f}% skipped)")


def _neighbors(args: argparse.Namespace) -> int:
    from lmstack.embed.vectors import load_vectors

    wv = load_vectors(args.vectors)
    for word, score in wv.neighbors(args.word, args.topn):
        print(f"{score:.4f}  {word}")
    return 0


def _analogy(args: argparse.Namespace) -> int:
    from lmstack.embed.vectors import load_vectors

    wv = load_vectors(args.vectors)
    for word, score in wv.analogy(args.a, args.b, args.c, args.topn, method=args.method):
        print(f"{score:.4f}  {word}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lmstack.embed.evaluate import analogy_accuracy, evaluate, word_similarity
    from lmstack.embed.vectors import load_vectors

    wv = load_vectors(args.vectors)
    if args.analogies or args.pairs:
        r = {"analogy": analogy_accuracy(wv, args.analogies, args.restrict_vocab),
             "analogy_mul": analogy_accuracy(wv, args.analogies, args.restrict_vocab, method="mul"),
             "wordsim353": word_similarity(wv, args.pairs, args.restrict_vocab)}
    else:
        r = evaluate(wv, args.restrict_vocab)
    print(_eval_lines(r))
    return 0
