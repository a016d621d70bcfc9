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

from lmstack.embed.config import GloVeConfig, VocabConfig, Word2VecConfig
from lmstack.embed.vectors import WordVectors, load_vectors
from lmstack.embed.vocab import Corpus, Vocab, build_corpus

__all__ = ["Corpus", "GloVeConfig", "Vocab", "VocabConfig", "Word2VecConfig", "WordVectors", "build_corpus",
           "evaluate", "load_vectors", "train_glove", "train_run", "train_word2vec"]


def train_word2vec(*args, **kwargs):
    """See :func:`lmstack.embed.word2vec.train_word2vec`."""
    from lmstack.embed.word2vec import train_word2vec as f

    return f(*args, **kwargs)


def train_glove(*args, **kwargs):
    """See :func:`lmstack.embed.glove.train_glove`."""
    from lmstack.embed.glove import train_glove as f

    return f(*args, **kwargs)


def train_run(*args, **kwargs):
    """See :func:`lmstack.embed.run.train_run`."""
    from lmstack.embed.run import train_run as f

    return f(*args, **kwargs)


def evaluate(*args, **kwargs):
    """See :func:`lmstack.embed.evaluate.evaluate`."""
    from lmstack.embed.evaluate import evaluate as f

    return f(*args, **kwargs)
