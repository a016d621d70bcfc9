"""Benchmark: lmstack's word2vec (and GloVe) against gensim's Word2Vec (optimised C), same text, same settings.

Text: ``../shared/data/text/`` (tiny Shakespeare + the TinyStories samples, ~4 MB, ~0.8 M words) where present,
else the speedrun's corpus (``runs/speedrun/corpus/train.jsonl``, or the built-in corpus built into a temporary
folder). Both read the same sentences (lines, words by lmstack's default regex, lowercased); the vocabulary is
the same (min count 5). Settings: skip-gram, dim 100, window 5 (dynamic), 5 noise words, subsampling 1e-3,
5 epochs, alpha 0.025 -> 0.0001.

Rows: gensim skip-gram with 1 and 2 worker threads and CBOW with 2; ours with negatives per pair (word2vec.c's
algorithm), eager and through ``torch.compile`` (``--compile``; compiled once in a warm-up, not timed), and with
noise words shared by a window (``--shared-negatives``), on 1 and 2 processes (Hogwild, ``workers``); ours
CBOW; GloVe (window 10, 25 epochs, x_max 10) for its scores. words/s = words of text x epochs / training
seconds (vocabulary building timed apart). Scores: the Google analogy set (3CosAdd and 3CosMul) and
WordSim-353 Spearman from gensim's test data, in-vocabulary items only (gensim's rules; lmstack.embed.evaluate,
whose numbers equal gensim's on the same vectors, tests/test_embed.py). One run each, one seed.

    .venv/bin/python bench/embed.py            # ~4 minutes on 2 cores
    .venv/bin/python bench/embed.py --quick    # 2 epochs, no GloVe
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from lmstack.embed import GloVeConfig, VocabConfig, Word2VecConfig, WordVectors, build_corpus
from lmstack.embed.evaluate import evaluate
from lmstack.embed.vocab import iter_sentences, word_splitter

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def corpus_paths() -> tuple[list[Path], str]:
    files = sorted(p for p in SHARED_TEXT.rglob("*.txt")) if SHARED_TEXT.is_dir() else []
    if files:
        return files, f"../shared/data/text ({len(files)} files)"
    own = Path("runs/speedrun/corpus/train.jsonl")
    if own.is_file():
        return [own], str(own)
    from lmstack.data.corpus import CorpusConfig, build_default_corpus

    out = Path(tempfile.mkdtemp()) / "corpus"
    build_default_corpus(out, CorpusConfig())
    return [out / "train.jsonl"], "the built-in speedrun corpus"


def scores(wv: WordVectors) -> dict:
    r = evaluate(wv)
    if "skipped" in r:
        return {"add": None, "mul": None, "ws": None, "questions": 0, "pairs": 0}
    return {"add": r["analogy"]["accuracy"], "mul": r["analogy_mul"]["accuracy"], "ws": r["wordsim353"]["spearman"],
            "questions": r["analogy"]["total"], "pairs": r["wordsim353"]["pairs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--inputs", nargs="*", help="other text (files, folders, globs) instead of the default")
    ap.add_argument("--glove-epochs", type=int, default=25)
    args = ap.parse_args()
    epochs = 2 if args.quick else args.epochs
    logging.getLogger("gensim").setLevel(logging.WARNING)
    from gensim.models import Word2Vec

    paths, where = (args.inputs, " ".join(args.inputs)) if args.inputs else corpus_paths()
    vcfg = VocabConfig(min_count=5)
    t0 = time.perf_counter()
    vocab, corpus = build_corpus(paths, vcfg)
    ours_vocab_s = time.perf_counter() - t0
    sentences = list(iter_sentences(paths, word_splitter(vcfg)))
    text_words = sum(map(len, sentences))
    print(f"text: {where}: {text_words:,} words, {len(sentences):,} lines; vocabulary {len(vocab):,} words "
          f"(min count 5), {corpus.words:,} words in it; ours built it in {ours_vocab_s:.1f} s", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
          f"jobs: timings are noisy)", flush=True)
    common = dict(dim=100, window=5, negative=5, sample=1e-3, alpha=0.025, min_alpha=0.0001, epochs=epochs, seed=1)
    rows = []

    for sg, workers in ((1, 1), (1, 2), (0, 2)):
        model = Word2Vec(vector_size=100, window=5, negative=5, hs=0, sample=1e-3, alpha=0.025, min_alpha=0.0001,
                         sg=sg, min_count=5, workers=workers, seed=1)
        model.build_vocab(sentences)
        t = time.perf_counter()
        model.train(sentences, total_examples=len(sentences), epochs=epochs)
        sec = time.perf_counter() - t
        wv = WordVectors(model.wv.index_to_key, model.wv.vectors)
        rows.append({"name": f"gensim {'skip-gram' if sg else 'CBOW'}, {workers} thread{'s' * (workers > 1)}",
                     "workers": workers, "seconds": sec, "wps": text_words * epochs / sec, **scores(wv),
                     "gensim": bool(sg)})
        print(rows[-1], flush=True)

    from lmstack.embed.vocab import Corpus
    from lmstack.embed.word2vec import train_word2vec_corpus

    # warm-up (torch's first calls), not timed
    head = Corpus(corpus.ids[:20000], corpus.sentence[:20000])
    train_word2vec_corpus(vocab, head, Word2VecConfig(**{**common, "epochs": 1}), progress=False)
    t = time.perf_counter()
    train_word2vec_corpus(vocab, head, Word2VecConfig(**{**common, "epochs": 1}, compile=True), progress=False)
    print(f"torch.compile of the pair update (warm-up, not timed below): {time.perf_counter() - t:.1f} s", flush=True)
    variants = [("ours skip-gram", dict(sg=True)), ("ours skip-gram, compiled", dict(sg=True, compile=True)),
                ("ours skip-gram, shared negatives", dict(sg=True, shared_negatives=True))]
    for name, extra in variants:
        for workers in (1, 2):
            cfg = Word2VecConfig(**common, **extra, workers=workers, threads=1)
            t = time.perf_counter()
            wv, _ = train_word2vec_corpus(vocab, corpus, cfg, progress=False)
            sec = time.perf_counter() - t
            rows.append({"name": f"{name}, {workers} process{'es' * (workers > 1)}", "workers": workers,
                         "seconds": sec, "wps": text_words * epochs / sec, **scores(wv)})
            print(rows[-1], flush=True)
    cfg = Word2VecConfig(**common, sg=False, workers=2, threads=1)
    t = time.perf_counter()
    wv, _ = train_word2vec_corpus(vocab, corpus, cfg, progress=False)
    sec = time.perf_counter() - t
    rows.append({"name": "ours CBOW, 2 processes", "workers": 2, "seconds": sec, "wps": text_words * epochs / sec,
                 **scores(wv)})
    print(rows[-1], flush=True)
    if not args.quick:
        from lmstack.embed.glove import train_glove_corpus

        t = time.perf_counter()
        # x_max 10 as GloVe's own demo.sh sets it for a small corpus (text8): with the default 100 nearly every
        # count of a 0.8 M-word text gets a tiny weight (measured here: 1.7% analogies at 10 epochs vs 5.5% at 15)
        gcfg = GloVeConfig(dim=100, window=10, epochs=args.glove_epochs, x_max=10)
        wv, hist = train_glove_corpus(vocab, corpus, gcfg, progress=False)
        sec = time.perf_counter() - t
        rows.append({"name": f"ours GloVe (window 10, x_max 10, {gcfg.epochs} epochs, loss {hist[0]['loss']:.4f} -> "
                             f"{hist[-1]['loss']:.4f})",
                     "workers": 1, "seconds": sec, "wps": None, **scores(wv)})
        print(rows[-1], flush=True)

    g1 = rows[0]
    by_workers = {r["workers"]: r for r in rows if r.get("gensim")}

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    print(f"\n{epochs} epochs; analogies: {g1['questions']:,} in-vocabulary questions of 19,544; WordSim-353: "
          f"{g1['pairs']} pairs of 353\n")
    print("| run | train s | words/s | vs gensim sg 1 thread | vs gensim sg same workers | analogy 3CosAdd % | "
          "3CosMul % | WS-353 Spearman |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = by_workers.get(r["workers"], g1)
        wps = "-" if r["wps"] is None else f"{r['wps']:,.0f}"
        ratio1 = "-" if r["wps"] is None else f"{r['wps'] / g1['wps']:.2f}x"
        ratio2 = "-" if r["wps"] is None else f"{r['wps'] / same['wps']:.2f}x"
        ws = "-" if r["ws"] is None else f"{r['ws']:.3f}"
        print(f"| {r['name']} | {r['seconds']:.1f} | {wps} | {ratio1} | {ratio2} | {pct(r['add'])} | "
              f"{pct(r['mul'])} | {ws} |")


if __name__ == "__main__":
    sys.exit(main())
