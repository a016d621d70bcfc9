"""lmstack.embed: static word embeddings. word2vec (skip-gram, CBOW) and GloVe, trained on any lmstack source;
nearest neighbours and analogies; the word2vec text/binary formats and safetensors; the Google analogy and
WordSim-353 evaluations.

    from lmstack.embed import train_word2vec, load_vectors

    wv, history = train_word2vec(["corpus/"], Word2VecConfig(dim=100), VocabConfig(min_count=5))
    wv.neighbors("king")                       # [(word, cosine), ...]
    wv.analogy("man", "king", "woman")         # man : king :: woman : ?  (3CosAdd; method="mul": 3CosMul)
    wv.save("vecs.bin"); load_vectors("vecs.bin")

Heavy modules (torch) are imported only when training starts.
"""

from __future__ import annotations

import importlib

# name -> module; imported on first use, so `lmstack --help` (which imports lmstack.embed.cli) loads none of it
_LAZY = {
    "GloVeConfig": "config", "VocabConfig": "config", "Word2VecConfig": "config",
    "WordVectors": "vectors", "load_vectors": "vectors",
    "Corpus": "vocab", "Vocab": "vocab", "build_corpus": "vocab",
    "train_word2vec": "word2vec", "train_glove": "glove", "train_run": "run", "evaluate": "evaluate",
}

__all__ = ["Corpus", "GloVeConfig", "Vocab", "VocabConfig", "Word2VecConfig", "WordVectors", "build_corpus",
           "evaluate", "load_vectors", "train_glove", "train_run", "train_word2vec"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lmstack.embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmstack.embed.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
