"""Trained word vectors: nearest neighbours, analogies, and the files other tools read.

Queries use cosine similarity on unit-normalised vectors. Analogies ("a is to b as c is to ?") follow Levy &
Goldberg (2014): 3CosAdd ranks x by cos(x, b) - cos(x, a) + cos(x, c) (the vector offset b - a + c, gensim's
``most_similar(positive=[b, c], negative=[a])``); 3CosMul by cos'(x, b) cos'(x, c) / (cos'(x, a) + eps) with
cos' = (cos + 1) / 2 (gensim's ``most_similar_cosmul``). The question words are never answers.

Files (``save``/``load_vectors`` pick the format by name):

- ``*.txt`` / ``*.vec``: the word2vec text format, a ``count dim`` header then ``word v1 v2 ...`` per line;
- ``*.bin``: the word2vec binary format, the same header then ``word `` + dim little-endian float32 per word
  (word2vec.c's layout; gensim's ``KeyedVectors.load_word2vec_format(binary=True)`` reads it);
- a folder: ``vectors.safetensors`` (tensor ``vectors``) and ``vocab.json`` (``words``, ``counts``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmstack.errors import DataError, LmstackError

METHODS = ("add", "mul")


class WordVectors:
    """Words (most frequent first), their vectors (float32, one row each) and their training counts."""

    def __init__(self, words: list[str], vectors: np.ndarray, counts: np.ndarray | None = None):
        if len(words) != len(vectors):
            raise ValueError(f"{len(words)} words but {len(vectors)} vectors")
        self.words = list(words)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.counts = np.zeros(len(words), np.int64) if counts is None else np.asarray(counts, np.int64)
        self.index = {w: i for i, w in enumerate(self.words)}
        self._unit: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def unit(self) -> np.ndarray:
        """The vectors scaled to length 1 (a zero vector stays zero)."""
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.where(norms > 0, norms, 1.0)
        return self._unit

    def id(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise LmstackError(f"word {word!r} is not in the vocabulary ({len(self.words):,} words); check its "
                               f"spelling and case (training lowercases by default), or train with a lower "
                               f"min_count") from None

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.id(word)]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two words."""
        return float(self.unit[self.id(a)] @ self.unit[self.id(b)])

    def neighbors(self, word: str, topn: int = 10) -> list[tuple[str, float]]:
        """The ``topn`` words closest to ``word`` by cosine, without the word itself."""
        i = self.id(word)
        return self._top(self.unit @ self.unit[i], topn, {i})

    def analogy(self, a: str, b: str, c: str, topn: int = 1, method: str = "add",
                eps: float = 1e-3) -> list[tuple[str, float]]:
        """"``a`` is to ``b`` as ``c`` is to ?": the ``topn`` best answers by 3CosAdd or 3CosMul, without a, b, c."""
        ia, ib, ic = self.id(a), self.id(b), self.id(c)
        return self._top(analogy_scores(self.unit, [ia], [ib], [ic], method, eps)[0], topn, {ia, ib, ic})

    def _top(self, scores: np.ndarray, topn: int, exclude: set[int]) -> list[tuple[str, float]]:
        scores = scores.astype(np.float64).copy()
        scores[list(exclude)] = -np.inf
        k = min(topn, len(scores) - len(exclude))
        if k <= 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.words[j], float(scores[j])) for j in best]

    # -------------------------------------------------------------------------------------------------------
    # files

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` in the format its name says (see the module docstring)."""
        from lmstack.runs import atomic_path, atomic_write_json

        path = Path(path)
        kind = _kind(path)
        if kind == "folder":
            from safetensors.numpy import save_file

            path.mkdir(parents=True, exist_ok=True)
            with atomic_path(path / "vectors.safetensors") as tmp:
                save_file({"vectors": self.vectors}, str(tmp))
            atomic_write_json(path / "vocab.json", {"words": self.words, "counts": self.counts.tolist()}, indent=None)
            return path
        _check_words(self.words)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(f"{len(self)} {self.dim}\n".encode())
            if kind == "text":
                f.writelines((w + " " + " ".join(f"{x:.6g}" for x in v) + "\n").encode("utf-8")
                             for w, v in zip(self.words, self.vectors))
            else:
                le = self.vectors.astype("<f4")
                f.writelines(w.encode("utf-8") + b" " + v.tobytes() + b"\n" for w, v in zip(self.words, le))
        return path


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".txt", ".vec", ".txt.gz")):
        return "text"
    if name.endswith(".bin"):
        return "binary"
    if path.suffix == "" or path.is_dir():
        return "folder"
    raise LmstackError(f"{path}: unknown vectors format; name it .txt or .vec (word2vec text), .bin (word2vec "
                       f"binary) or a folder (safetensors + vocab.json)")


def _check_words(words: list[str]) -> None:
    bad = next((w for w in words if not w or any(ch.isspace() for ch in w)), None)
    if bad is not None:
        raise LmstackError(f"word {bad!r}: the word2vec formats cannot hold an empty word or one with whitespace; "
                           f"save as a folder (safetensors) instead")


def load_vectors(path: str | os.PathLike) -> WordVectors:
    """Read vectors written by :meth:`WordVectors.save` (or by word2vec.c / gensim in the word2vec formats); a
    folder holding an ``embed train`` run is read from its ``vectors.safetensors`` + ``vocab.json``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (give a folder written by `lmstack embed train` or a "
                        f".txt/.vec/.bin word2vec file)")
    kind = _kind(path)
    if kind == "folder":
        if not (path / "vectors.safetensors").is_file():
            raise DataError(f"{path}: no vectors.safetensors here; is it a folder written by `lmstack embed train`?")
        from safetensors.numpy import load_file

        from lmstack.runs import read_json

        vocab = read_json(path / "vocab.json")
        return WordVectors(vocab["words"], load_file(str(path / "vectors.safetensors"))["vectors"], vocab.get("counts"))
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n")
    try:
        count, dim = (int(x) for x in head.split())
    except ValueError:
        raise DataError(f"{path}: the first line must be '<words> <dim>' (word2vec format)") from None
    words: list[str] = []
    if kind == "text":
        lines = body.decode("utf-8").splitlines()
        vecs = np.empty((count, dim), np.float32)
        for i, line in enumerate(lines[:count]):
            parts = line.rstrip().split(" ")
            if len(parts) != dim + 1:
                raise DataError(f"{path}:{i + 2}: expected a word and {dim} numbers, got {len(parts)} fields")
            words.append(parts[0])
            vecs[i] = np.asarray(parts[1:], dtype=np.float32)
        if len(words) != count:
            raise DataError(f"{path}: the header says {count} words, the file holds {len(words)}")
        return WordVectors(words, vecs)
    vecs = np.empty((count, dim), np.float32)
    pos, width = 0, 4 * dim
    for i in range(count):
        while pos < len(body) and body[pos:pos + 1] in (b"\n", b" "):
            pos += 1  # word2vec.c ends each vector with a newline, gensim does not
        space = body.find(b" ", pos)
        if space < 0 or space + 1 + width > len(body):
            raise DataError(f"{path}: truncated at word {i + 1} of {count}")
        words.append(body[pos:space].decode("utf-8", errors="replace"))
        vecs[i] = np.frombuffer(body, dtype="<f4", count=dim, offset=space + 1)
        pos = space + 1 + width
    return WordVectors(words, vecs)


def analogy_scores(unit: np.ndarray, a: list[int], b: list[int], c: list[int], method: str = "add",
                   eps: float = 1e-3) -> np.ndarray:
    """Scores of every word as the answer to each question (a_i : b_i :: c_i : ?), shape (questions, words)."""
    if method not in METHODS:
        raise LmstackError(f"analogy method {method!r}: use 'add' (3CosAdd) or 'mul' (3CosMul)")
    if method == "add":
        # gensim: the mean of the unit vectors of b, c and -a, normalised, against every unit vector
        q = unit[b] + unit[c] - unit[a]
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q @ unit.T
    ca, cb, cc = ((unit[x] @ unit.T + 1.0) / 2.0 for x in (a, b, c))
    return cb * cc / (ca + eps)
