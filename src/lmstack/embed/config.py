"""Configs of the static word embeddings: the vocabulary, word2vec and GloVe.

Every check happens when a config is built, so a bad value fails before any text is read; the message names
the field and the fix (a :class:`~lmstack.errors.ConfigError`, one line, exit code 2 in the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmstack.errors import ConfigError


def _check(section: str, ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{section}.{field}: must be {rule}, got {value!r}")


@dataclass
class VocabConfig:
    """Which strings are words, and which words get a vector.

    ``split="regex"`` takes the matches of ``pattern`` (default: runs of letters/digits with inner
    apostrophes, so "don't" and "king's" stay one word), ``"whitespace"`` splits on whitespace, and
    ``"tokenizer"`` uses the tokens of the lmstack tokenizer at ``tokenizer`` as words.
    Words seen fewer than ``min_count`` times are dropped; ``max_vocab > 0`` keeps only that many of the most
    frequent (ties broken by first appearance, so the vocabulary is deterministic).
    """

    split: Literal["regex", "whitespace", "tokenizer"] = "regex"
    pattern: str = r"\w+(?:'\w+)*"
    lowercase: bool = True
    tokenizer: str = ""
    min_count: int = 5
    max_vocab: int = 0
    text_field: str = "text"

    def __post_init__(self) -> None:
        _check("vocab", self.split in ("regex", "whitespace", "tokenizer"), "split",
               "one of regex, whitespace, tokenizer", self.split)
        _check("vocab", self.min_count >= 1, "min_count", ">= 1", self.min_count)
        _check("vocab", self.max_vocab >= 0, "max_vocab", ">= 0 (0 = no limit)", self.max_vocab)
        if self.split == "tokenizer" and not self.tokenizer:
            raise ConfigError("vocab.tokenizer: split='tokenizer' needs the path of a tokenizer (file or folder)")
        if self.split == "regex":
            import re

            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"vocab.pattern: not a valid regular expression ({e})") from None


@dataclass
class Word2VecConfig:
    """word2vec with negative sampling (Mikolov et al. 2013), as word2vec.c / gensim train it.

    ``alpha`` decays linearly to ``min_alpha`` over all words of all epochs; each centre word's window is
    drawn uniformly from 1..``window`` (the "dynamic window"); words are dropped with Mikolov's subsampling
    at threshold ``sample`` (0 = off); ``negative`` noise words per positive come from the unigram
    distribution raised to ``ns_exponent``. ``batch_size`` (centre, context) pairs are updated at once
    (vectorised SGD with sparse row updates); ``threads`` are the torch intra-op threads (0 = all cores).
    """

    dim: int = 100
    sg: bool = True                  # skip-gram; False = CBOW (mean of the context vectors)
    window: int = 5
    negative: int = 5
    ns_exponent: float = 0.75
    sample: float = 1e-3
    alpha: float = 0.025
    min_alpha: float = 0.0001
    epochs: int = 5
    batch_size: int = 2048
    seed: int = 1
    threads: int = 1                 # torch threads (0 = all cores); 2 threads were slower on a shared 2-core box
    shared_negatives: bool = False   # skip-gram: one set of noise words per window (pWord2Vec), faster
    workers: int = 1                 # processes updating the same matrices without locks (Hogwild), fork only
    compile: bool = False            # skip-gram per pair: torch.compile the update (fused; ~10 s to compile)

    def __post_init__(self) -> None:
        s = "word2vec"
        _check(s, self.dim >= 1, "dim", ">= 1 (the vector size, e.g. 100)", self.dim)
        _check(s, self.window >= 1, "window", ">= 1 (context words each side, e.g. 5)", self.window)
        _check(s, self.negative >= 1, "negative", ">= 1 (noise words per positive pair, e.g. 5)", self.negative)
        _check(s, self.epochs >= 1, "epochs", ">= 1", self.epochs)
        _check(s, self.alpha > 0, "alpha", "> 0 (e.g. 0.025)", self.alpha)
        _check(s, 0 <= self.min_alpha <= self.alpha, "min_alpha", f"in [0, alpha={self.alpha}]", self.min_alpha)
        _check(s, 0 <= self.sample < 1, "sample", "in [0, 1) (0 = no subsampling, e.g. 1e-3)", self.sample)
        _check(s, self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _check(s, self.threads >= 0, "threads", ">= 0 (0 = all cores)", self.threads)
        _check(s, self.workers >= 1, "workers", ">= 1", self.workers)
        if self.compile and not (self.sg and not self.shared_negatives):
            raise ConfigError("word2vec.compile: only the per-pair skip-gram update is compiled; drop compile, "
                              "or use sg=True without shared_negatives")


@dataclass
class GloVeConfig:
    """GloVe (Pennington et al. 2014): co-occurrence counts within ``window`` words each side, weighted 1/distance;
    the weighted least-squares fit of log X with f(x) = min(1, (x/x_max)^alpha), AdaGrad at ``lr``; the
    saved vector of a word is its word vector plus its context vector."""

    dim: int = 100
    window: int = 10
    x_max: float = 100.0
    alpha: float = 0.75
    lr: float = 0.05
    epochs: int = 25
    batch_size: int = 4096
    seed: int = 1
    threads: int = 1                 # torch threads (0 = all cores); 2 threads were slower on a shared 2-core box

    def __post_init__(self) -> None:
        s = "glove"
        _check(s, self.dim >= 1, "dim", ">= 1 (the vector size, e.g. 100)", self.dim)
        _check(s, self.window >= 1, "window", ">= 1 (context words each side, e.g. 10)", self.window)
        _check(s, self.epochs >= 1, "epochs", ">= 1", self.epochs)
        _check(s, self.x_max > 0, "x_max", "> 0 (e.g. 100)", self.x_max)
        _check(s, self.alpha > 0, "alpha", "> 0 (e.g. 0.75)", self.alpha)
        _check(s, self.lr > 0, "lr", "> 0 (e.g. 0.05)", self.lr)
        _check(s, self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _check(s, self.threads >= 0, "threads", ">= 0 (0 = all cores)", self.threads)
