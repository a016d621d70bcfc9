"""The speedrun's embeddings stage: word2vec on the speedrun corpus, neighbours of its frequent content words,
and the analogy / word-similarity scores where gensim's test data are installed.

:func:`speedrun_embed` reads ``RUN/corpus/train.jsonl`` (rows ``{"text", "source"}``, written by the corpus
stage), trains skip-gram word2vec into ``RUN/embed/`` (the folder ``lmstack embed neighbors RUN/embed WORD``
reads) and returns its results and its report section. The query words, when not given, are the most frequent
words of at least 5 letters after the 50 most frequent words (which are mostly function words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.errors import DataError


def content_words(words: list[str], n: int, skip: int = 50, min_len: int = 5) -> list[str]:
    """``n`` frequent content words of a frequency-sorted vocabulary: alphabetic, ``min_len`` letters or more,
    after the ``skip`` most frequent words."""
    picked = [w for w in words[skip:] if w.isalpha() and len(w) >= min_len][:n]
    return picked or [w for w in words if w.isalpha()][:n]


def speedrun_embed(run: str | Path, corpus_path: str | Path | None = None, *, dim: int = 50, epochs: int = 5,
                   window: int = 5, min_count: int = 5, words: list[str] | None = None, n_words: int = 5,
                   topn: int = 5, seed: int = 1337, progress: bool = False) -> tuple[dict[str, Any], str]:
    """Train word2vec (skip-gram, negative sampling) on the run's corpus into ``RUN/embed``; returns
    ``(results, report_md)``."""
    from lmstack.embed.config import VocabConfig, Word2VecConfig
    from lmstack.embed.run import train_run

    run = Path(run)
    corpus = Path(corpus_path) if corpus_path else run / "corpus" / "train.jsonl"
    if not corpus.exists():
        raise DataError(f"{corpus}: the corpus is missing; the embed stage runs after the corpus stage")
    cfg = Word2VecConfig(dim=dim, epochs=epochs, window=window, seed=seed)
    wv, summary = train_run([corpus], run / "embed", "word2vec", VocabConfig(min_count=min_count), cfg,
                            progress=progress)
    queries = [w for w in (words or content_words(wv.words, n_words)) if w in wv]
    neighbours = {w: wv.neighbors(w, topn) for w in queries}
    ev = summary.get("eval", {})
    rows = "\n".join(f"| {w} | " + ", ".join(f"{n} ({s:.2f})" for n, s in nb) + " |" for w, nb in neighbours.items())
    report = (f"Skip-gram word2vec (negative sampling, {cfg.negative} noise words, window {window}, subsampling "
              f"{cfg.sample:g}, {epochs} epochs, dim {dim}; `lmstack embed train`) on the training split: "
              f"{summary['words']:,} words, {summary['vocab_size']:,} in the vocabulary (min count {min_count}), "
              f"{summary['seconds']:.1f} s ({summary['words_per_s']:,.0f} words/s), loss "
              f"{summary['loss_first']:.3f} -> {summary['loss_last']:.3f}. The vectors are in `embed/`: try "
              f"`lmstack embed neighbors {run}/embed WORD`.\n\n"
              f"Nearest neighbours (cosine) of frequent words of the corpus:\n\n| word | neighbours |\n|---|---|\n"
              f"{rows}\n\n" + _scores(ev))
    results = {k: summary[k] for k in ("words", "vocab_size", "dim", "epochs", "loss_first", "loss_last",
                                       "seconds", "words_per_s")}
    results["neighbors"] = {w: [[n, round(s, 4)] for n, s in nb] for w, nb in neighbours.items()}
    results["eval"] = _compact(ev)
    return results, report


def _scores(ev: dict) -> str:
    if not ev or "skipped" in ev:
        return f"Analogy and WordSim-353 scores: skipped ({ev.get('skipped', 'not run')}).\n"
    a, m, w = ev["analogy"], ev["analogy_mul"], ev["wordsim353"]
    acc = "n/a" if a["accuracy"] is None else f"{100 * a['accuracy']:.1f}%"
    mul = "n/a" if m["accuracy"] is None else f"{100 * m['accuracy']:.1f}%"
    ws = "n/a" if w["spearman"] is None else f"{w['spearman']:.3f}"
    return (f"Google analogies (in-vocabulary questions only, as gensim scores them): 3CosAdd {acc}, 3CosMul {mul} "
            f"of {a['total']:,} questions ({a['oov_ratio']:.0f}% of the set has a word the corpus lacks); "
            f"WordSim-353 Spearman {ws} on {w['pairs']} pairs. A corpus of Python documentation holds few of "
            f"the words of these general-English sets, so the scores are low and noisy here.\n")


def _compact(ev: dict) -> dict:
    if not ev or "skipped" in ev:
        return ev
    return {"analogy_accuracy": ev["analogy"]["accuracy"], "analogy_mul_accuracy": ev["analogy_mul"]["accuracy"],
            "analogy_questions": ev["analogy"]["total"], "wordsim353_spearman": ev["wordsim353"]["spearman"],
            "wordsim353_pairs": ev["wordsim353"]["pairs"]}
