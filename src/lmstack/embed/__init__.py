"""lmstack.embed: static word embeddings (word2vec, GloVe)."""
