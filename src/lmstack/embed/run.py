"""One training run of word vectors into a folder, and reading it back.

Layout of ``OUT/``::

    vectors.safetensors, vocab.json   the vectors and the words with their counts (lmstack.embed.load_vectors)
    vectors.bin / vectors.txt         the word2vec binary / text formats (gensim, word2vec.c and others read them)
    config.json                       the method and every setting
    train_log.jsonl                   one record per epoch (loss, learning rate, words/s)
    summary.json                      sizes, loss, time and the evaluation scores where gensim's data exist
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from lmstack.embed.config import GloVeConfig, VocabConfig, Word2VecConfig
from lmstack.embed.vectors import WordVectors
from lmstack.errors import ConfigError

FORMATS = ("bin", "txt")


def train_run(inputs: Iterable | str | os.PathLike, out: str | os.PathLike, method: str = "word2vec",
              vocab: VocabConfig | None = None, word2vec: Word2VecConfig | None = None,
              glove: GloVeConfig | None = None, formats: Iterable[str] = ("bin",), evaluate: bool = True,
              progress: bool = True) -> tuple[WordVectors, dict]:
    """Train ``method`` (word2vec or glove) on ``inputs`` and write the run folder ``out``; returns the vectors and
    the summary."""
    from lmstack.embed.evaluate import evaluate as run_eval
    from lmstack.embed.vocab import build_corpus
    from lmstack.runs import atomic_write_json

    if method not in ("word2vec", "glove"):
        raise ConfigError(f"method: {method!r} is not a method; use word2vec or glove")
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"formats: unknown {', '.join(bad)}; use bin and/or txt (safetensors is always written)")
    vocab = vocab or VocabConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder")
    t0 = time.perf_counter()
    vocab_obj, corpus = build_corpus(inputs, vocab)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    log.unlink(missing_ok=True)
    if method == "word2vec":
        from lmstack.embed.word2vec import train_word2vec_corpus

        cfg = word2vec or Word2VecConfig()
        wv, history = train_word2vec_corpus(vocab_obj, corpus, cfg, log, progress)
    else:
        from lmstack.embed.glove import train_glove_corpus

        cfg = glove or GloVeConfig()
        wv, history = train_glove_corpus(vocab_obj, corpus, cfg, log, progress)
    seconds = time.perf_counter() - t0
    wv.save(out)
    for fmt in formats:
        wv.save(out / f"vectors.{fmt}")
    atomic_write_json(out / "config.json", {"method": method, "vocab": asdict(vocab), method: asdict(cfg)})
    summary = {"method": method, "words": corpus.words, "vocab_size": len(wv), "dim": wv.dim,
               "epochs": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
               "seconds": round(seconds, 2), "words_per_s": corpus.words * len(history) / max(seconds, 1e-9)}
    if evaluate:
        summary["eval"] = run_eval(wv)
    atomic_write_json(out / "summary.json", summary)
    return wv, summary
