"""Byte-level BPE: training, encoding, decoding.

Training (``train_bpe``), as in GPT-2/GPT-4:

1. Stream the documents, cut them into ~1 MB chunks at places where the split pattern always has a token
   boundary, and count the regex pre-tokens of each chunk in worker processes (one per core). Only the
   table ``pre-token -> count`` is kept: a corpus of 50 MB has a few hundred thousand distinct words.
2. Every distinct word starts as its UTF-8 bytes (ids 0..255). Count adjacent pairs once, weighted by
   word frequency, and remember which words hold each pair.
3. Repeatedly take the most frequent pair (ties: the smallest pair of ids, so training is deterministic),
   give it a new id, and rewrite only the words that hold it, adjusting the counts of the pairs around
   each occurrence. A lazy max-heap finds the best pair: counts only fall, except for pairs with the new
   id, which are pushed afresh, so a popped entry whose count is stale is simply pushed back corrected.

A merge whose bytes already form a token (``"a" + "aa"`` after ``"aa" + "a"``) reuses that token's id
instead of adding a duplicate; every token is then a distinct byte string and its id is its rank.

Encoding follows tiktoken's rule, which a byte-level BPE with unique token bytes admits: split the text
with the pattern, and in each piece repeatedly join the adjacent pair whose joined bytes form the
lowest-ranked token (leftmost on ties); a piece that is itself a token is emitted whole. The fast path
(:mod:`lmstack.tokenizer.fast`) hands the same ranks to ``tiktoken.Encoding`` and gets the same ids.

Tokenizers imported from Hugging Face whose merges are not of this form keep HF's rule instead (join the
adjacent pair that comes first in the merge list); :class:`BPETokenizer` implements both.

Decoding joins the token bytes and decodes UTF-8 with ``errors="replace"``: ids that cut a character in
two give U+FFFD for the broken part (the same policy as tiktoken and HF's ByteLevel decoder);
``decode_bytes`` returns the exact bytes.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import regex

from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.tokenizer.base import (
    SpecialTokenIds,
    DEFAULT_SPECIAL_TOKENS,
    AllowedSpecial,
    resolve_pattern,
    split_specials,
)

MAX_VOCAB = 1 << 20  # pair keys pack two ids into one int: (a << 20) | b
_SHIFT = 20
_LOW = (1 << _SHIFT) - 1
_CNT = 40  # heap entries pack (-count, pair) into one int: -count * 2**40 + pair
_INF = sys.maxsize
CHUNK_CHARS = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Step 1: counting pre-tokens, streamed and in parallel


def iter_texts(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[str]:
    """Documents of ``inputs``: ``str`` items are text, path items are files read by lmstack.sources."""
    from lmstack.sources import iter_documents

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for item in inputs:
        if isinstance(item, str):
            if item:
                yield item
        elif isinstance(item, os.PathLike):
            yield from iter_documents([item])
        else:
            raise LmstackError(f"training input must be text (str) or a path, got {type(item).__name__}")


def _safe_cuts(doc: str, size: int) -> Iterator[str]:
    """Cut a long document after a newline that sits between two non-space characters.

    No token of the gpt2/gpt4 patterns crosses such a place (a newline is never glued to the word after it)
    and the pattern's look-ahead sees the same thing on both sides, so counts equal those of the whole text.
    """
    start, n = 0, len(doc)
    while n - start > size + size // 2:
        i = doc.find("\n", start + size)
        while i != -1 and not (0 < i < n - 1 and not doc[i - 1].isspace() and not doc[i + 1].isspace()):
            i = doc.find("\n", i + 1)
        if i == -1:
            break
        yield doc[start:i + 1]
        start = i + 1
    yield doc[start:]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    buf: list[str] = []
    filled = 0
    for doc in texts:
        for piece in _safe_cuts(doc, size):
            buf.append(piece)
            filled += len(piece)
            if filled >= size:
                yield buf
                buf, filled = [], 0
    if buf:
        yield buf


def _count_chunk(pattern: regex.Pattern, chunk: list[str]) -> Counter:
    return Counter(itertools.chain.from_iterable(map(pattern.findall, chunk)))


def _count_worker(pattern_str: str, tasks: Any, results: Any) -> None:
    """Runs in a child process: count every chunk it receives, send one Counter back at the end."""
    try:
        pattern = regex.compile(pattern_str)
        total: Counter = Counter()
        while (chunk := tasks.get()) is not None:
            total.update(_count_chunk(pattern, chunk))
        results.put(("ok", dict(total)))
    except BaseException as e:  # pragma: no cover - a bug, reported to the parent with its message
        results.put(("error", f"{type(e).__name__}: {e}"))


def count_pretokens(inputs: Iterable[str | os.PathLike] | str | os.PathLike, pattern: str = "gpt4",
                    workers: int | None = None, chunk_chars: int = CHUNK_CHARS) -> Counter:
    """``pre-token string -> count`` over all documents of ``inputs``, in ``workers`` processes.

    Small inputs (under 4 chunks) are counted in this process; larger ones stream through a bounded queue, so
    memory holds a few chunks plus the count tables, whatever the corpus size.
    """
    pat = regex.compile(resolve_pattern(pattern))
    chunks = _chunks(iter_texts(inputs), chunk_chars)
    head = list(itertools.islice(chunks, 4))  # below ~4 chunks, starting processes costs more than it saves
    if not head:
        raise DataError("no text to train on (the inputs are empty)")
    workers = min(workers or os.cpu_count() or 1, 8)
    if len(head) < 4 or workers <= 1:
        total: Counter = Counter()
        for chunk in itertools.chain(head, chunks):
            total.update(_count_chunk(pat, chunk))
        return total

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    tasks, results = ctx.Queue(maxsize=2 * workers), ctx.Queue()
    procs = [ctx.Process(target=_count_worker, args=(pat.pattern, tasks, results), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for chunk in itertools.chain(head, chunks):
            tasks.put(chunk)
        for _ in procs:
            tasks.put(None)
        total = Counter()
        for _ in procs:
            status, payload = results.get()
            if status != "ok":
                raise RuntimeError(f"pre-token counting failed in a worker: {payload}")
            total.update(payload)
        for p in procs:
            p.join()
        return total
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()


# ---------------------------------------------------------------------------------------------------------
# Steps 2-3: learning merges incrementally


def learn_merges(word_counts: dict[str, int], n_tokens: int, progress: bool = False
                 ) -> tuple[list[bytes], list[tuple[int, int, int]]]:
    """Grow the 256 byte tokens to ``n_tokens`` tokens by merging frequent pairs of ``word_counts``.

    Returns ``(vocab, merges)``: ``vocab[id]`` is the token's bytes (ids 0..255 are the bytes themselves);
    ``merges`` lists ``(a, b, new_id)`` in the order learned (``new_id`` may be an existing token, see the
    module docstring). Stops early if no pair is left.
    """
    vocab = [bytes([i]) for i in range(256)]
    token_of = {b: i for i, b in enumerate(vocab)}
    merges: list[tuple[int, int, int]] = []
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, f in word_counts.items():
        w = list(word.encode("utf-8"))
        if len(w) > 1:
            words.append(w)
            freqs.append(f)

    pc: dict[int, int] = {}  # pair -> weighted count
    where: dict[int, set[int]] = {}  # pair -> indices of words that held it (may be stale, never missing)
    for i, w in enumerate(words):
        f = freqs[i]
        for a, b in zip(w, w[1:]):
            k = (a << _SHIFT) | b
            pc[k] = pc.get(k, 0) + f
            s = where.get(k)
            if s is None:
                where[k] = {i}
            else:
                s.add(i)
    heap = [-(c << _CNT) + k for k, c in pc.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from lmstack.runs import Progress

        bar = Progress(total=n_tokens - 256, desc="bpe merges", unit="tok")
    while len(vocab) < n_tokens and heap:
        top = heap[0]
        count, key = -(top >> _CNT), top & ((1 << _CNT) - 1)
        current = pc.get(key, 0)
        if current != count:  # stale: the count fell since this entry was pushed
            heapq.heappop(heap)
            if current > 0:
                heapq.heappush(heap, -(current << _CNT) + key)
            continue
        heapq.heappop(heap)
        a, b = key >> _SHIFT, key & _LOW
        joined = vocab[a] + vocab[b]
        z = token_of.get(joined)
        if z is None:
            z = len(vocab)
            vocab.append(joined)
            token_of[joined] = z
            if bar is not None and z % 256 == 0:
                bar.update(z + 1 - 256 - bar.done)
        merges.append((a, b, z))
        del pc[key]
        grown: set[int] = set()
        for i in where.pop(key):
            w = words[i]
            f = freqs[i]
            n = len(w)
            new: list[int] = []
            j = 0
            while j < n:
                if w[j] == a and j + 1 < n and w[j + 1] == b:
                    if new:  # left neighbour x: (x, a) becomes (x, z)
                        x = new[-1]
                        k = (x << _SHIFT) | a
                        if k != key:
                            pc[k] -= f
                        k = (x << _SHIFT) | z
                        pc[k] = pc.get(k, 0) + f
                        where.setdefault(k, set()).add(i)
                        grown.add(k)
                    if j + 2 < n:  # right neighbour y: (b, y) becomes (z, y)
                        y = w[j + 2]
                        k = (b << _SHIFT) | y
                        if k != key:
                            pc[k] -= f
                        k = (z << _SHIFT) | y
                        pc[k] = pc.get(k, 0) + f
                        where.setdefault(k, set()).add(i)
                        grown.add(k)
                    new.append(z)
                    j += 2
                else:
                    new.append(w[j])
                    j += 1
            words[i] = new
        for k in grown:
            c = pc[k]
            if c > 0:
                heapq.heappush(heap, -(c << _CNT) + k)
    if bar is not None:
        bar.update(len(vocab) - 256 - bar.done)
        bar.close()
    return vocab, merges


def train_bpe(inputs: Iterable[str | os.PathLike] | str | os.PathLike, vocab_size: int, *,
              pattern: str = "gpt4", special_tokens: Sequence[str] | None = None,
              workers: int | None = None, progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE tokenizer.

    ``inputs``: ``str`` items are text, ``os.PathLike`` items are files/folders/globs read with
    :func:`lmstack.sources.iter_documents` (.txt/.md/.jsonl/.json/.parquet). ``vocab_size`` counts the 256
    byte tokens, the merges and the special tokens (default: bos/eos/pad and the chat role markers), which
    take the last ids. ``pattern``: ``"gpt2"``, ``"gpt4"`` or a regex. If the corpus runs out of pairs
    first, the tokenizer is smaller than asked (``.vocab_size`` tells).
    """
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials) or any(not isinstance(s, str) or not s for s in specials):
        raise ConfigError("special_tokens: must be distinct non-empty strings")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ConfigError(f"vocab_size: expected an integer, got {vocab_size!r}")
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise ConfigError(f"vocab_size {vocab_size} is too small: it must be at least 256 byte tokens + "
                          f"{len(specials)} special tokens = {floor}")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(f"vocab_size {vocab_size} is too large (at most {MAX_VOCAB})")
    pat = resolve_pattern(pattern)
    counts = count_pretokens(inputs, pat, workers=workers)
    vocab, merges = learn_merges(counts, vocab_size - len(specials), progress=progress)
    return BPETokenizer(vocab, pattern=pat, special_tokens={s: len(vocab) + i for i, s in enumerate(specials)},
                        merges=[(a, b) for a, b, _ in merges])


# ---------------------------------------------------------------------------------------------------------
# Encoding


def _merge_parts(parts: list, join: Callable[[Any, Any], tuple[int, Any] | None]) -> list:
    """Apply BPE to ``parts``: repeatedly join the adjacent pair of lowest rank (leftmost on ties).

    ``join(x, y)`` gives ``(rank, joined)`` or None when x and y do not merge. Short pieces keep a list of
    pair ranks (``min``/``index`` run in C); long ones (say, a 100 kB run of letters) use a heap over a
    linked list, O(n log n) instead of O(n^2).
    """
    if len(parts) > 256:
        return _merge_parts_long(parts, join)
    pairs = [join(x, y) for x, y in zip(parts, parts[1:])]
    ranks = [_INF if p is None else p[0] for p in pairs]
    while ranks:
        m = min(ranks)
        if m == _INF:
            break
        i = ranks.index(m)
        parts[i:i + 2] = [pairs[i][1]]
        del ranks[i], pairs[i]
        if i < len(ranks):
            p = pairs[i] = join(parts[i], parts[i + 1])
            ranks[i] = _INF if p is None else p[0]
        if i > 0:
            p = pairs[i - 1] = join(parts[i - 1], parts[i])
            ranks[i - 1] = _INF if p is None else p[0]
    return parts


def _merge_parts_long(parts: list, join: Callable[[Any, Any], tuple[int, Any] | None]) -> list:
    n = len(parts)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        p = join(parts[i], parts[i + 1])
        if p is not None:
            heap.append((p[0], i, nxt[i]))
    heapq.heapify(heap)
    while heap:
        rank, i, j = heapq.heappop(heap)
        if not alive[i] or nxt[i] != j or j >= n or not alive[j]:
            continue  # stale: one side was merged since this pair was pushed
        p = join(parts[i], parts[j])
        if p is None or p[0] != rank:
            continue  # stale: the right side grew since this pair was pushed
        parts[i] = p[1]
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        for left, right in ((prv[i], i), (i, nxt[i])):
            if left >= 0 and right < n:
                q = join(parts[left], parts[right])
                if q is not None:
                    heapq.heappush(heap, (q[0], left, right))
    return [parts[i] for i in range(n) if alive[i]]


class BPETokenizer(SpecialTokenIds):
    """A byte-level BPE tokenizer: token bytes, ranks, a split pattern and special tokens.

    Two encoding rules, chosen at construction:
    - ``merges is None`` or our own training (``rank_rule=True``): tiktoken's rule, token id = rank; the
      tiktoken fast path is used when it can be built (``use_fast``).
    - ``rank_rule=False`` (imported HF merges): HF's rule, ``merges[i] = (a, b)`` has priority i and makes
      the token whose bytes are ``vocab[a] + vocab[b]``.
    """

    def __init__(self, vocab: Sequence[bytes] | dict[int, bytes], *, pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, merges: Sequence[tuple[int, int]] | None = None,
                 rank_rule: bool = True, ignore_merges: bool = True, use_fast: bool = True):
        self._vocab: dict[int, bytes] = dict(vocab) if isinstance(vocab, dict) else dict(enumerate(vocab))
        self.pattern = resolve_pattern(pattern)
        self._re = regex.compile(self.pattern)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._encoder = {b: i for i, b in self._vocab.items()}
        if len(self._encoder) != len(self._vocab):
            raise DataError("tokenizer vocab: two tokens have the same bytes")
        missing = [i for i in range(256) if bytes([i]) not in self._encoder]
        if missing:
            raise DataError(f"tokenizer vocab: byte tokens missing (e.g. byte {missing[0]}); not byte-level")
        clash = set(self.special_tokens.values()) & set(self._vocab)
        if clash:
            raise DataError(f"tokenizer vocab: special token ids {sorted(clash)[:5]} are also ordinary tokens")
        self._decoder = {**self._vocab, **{i: s.encode("utf-8") for s, i in self.special_tokens.items()}}
        self.merges = [tuple(m) for m in merges] if merges is not None else None
        self.rank_rule = rank_rule
        self.ignore_merges = ignore_merges if not rank_rule else True
        self._byte_ids = [self._encoder[bytes([i])] for i in range(256)]
        if not rank_rule:
            if self.merges is None:
                raise DataError("tokenizer: the merge-list rule needs merges")
            self._pair_rank: dict[tuple[int, int], tuple[int, int]] = {}
            for r, (a, b) in enumerate(self.merges):
                z = self._encoder.get(self._vocab[a] + self._vocab[b])
                if z is None:
                    raise DataError(f"tokenizer merges: merge {r} makes a token that is not in the vocab")
                self._pair_rank.setdefault((a, b), (r, z))
        self._cache: dict[str, list[int]] = {}
        # Whether this tokenizer's own default puts BOS before a text (False for lmstack's: its data pipeline
        # separates documents with EOS); imported tokenizers set it from their post-processor / config.
        self.add_bos = False
        self.use_fast = use_fast
        self._fast: Any = None
        self._fast_tried = False

    # -- sizes and special ids ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids are dense in everything we train or import)."""
        return max(self._decoder) + 1

    @property
    def ranks(self) -> dict[bytes, int]:
        """``token bytes -> id`` for the ordinary tokens (tiktoken's ``mergeable_ranks``)."""
        return dict(self._encoder)

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._decoder[token_id]
        except (KeyError, TypeError):
            raise LmstackError(f"token id {token_id!r} is not in the vocab (size {self.vocab_size})") from None

    # -- encoding ----------------------------------------------------------------------------------------
    @property
    def fast(self) -> Any:
        """The ``tiktoken.Encoding`` built from our ranks, or None (HF merge rule, or tiktoken refused)."""
        if not self._fast_tried:
            self._fast_tried = True
            if self.rank_rule:
                from lmstack.tokenizer.fast import build_tiktoken

                self._fast = build_tiktoken(self)
        return self._fast

    def encode(self, text: str, *, allowed_special: AllowedSpecial = None, fast: bool | None = None) -> list[int]:
        """Ids of ``text``. Special-token strings in the text stay plain text unless ``allowed_special``
        is ``"all"`` or names them. ``fast=False`` forces the pure-Python path (same ids)."""
        if not isinstance(text, str):
            raise LmstackError(f"encode expects a str, got {type(text).__name__}")
        enc = self.fast if (fast if fast is not None else self.use_fast) else None
        if enc is not None:  # tiktoken replaces lone surrogates itself, as _clean_surrogates does
            if allowed_special:
                allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
                split_specials("", allowed, self.special_tokens)  # validates the names
                return enc.encode(text, allowed_special=allowed, disallowed_special=())
            return enc.encode_ordinary(text)
        text = _clean_surrogates(text)
        out: list[int] = []
        for seg in split_specials(text, allowed_special, self.special_tokens):
            if isinstance(seg, int):
                out.append(seg)
            else:
                out.extend(self._encode_ordinary(seg))
        return out

    def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = None,
                     fast: bool | None = None, num_threads: int = 2) -> list[list[int]]:
        enc = self.fast if (fast if fast is not None else self.use_fast) else None
        if enc is not None and not allowed_special:
            return enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [self.encode(t, allowed_special=allowed_special, fast=fast) for t in texts]

    def _encode_ordinary(self, text: str) -> list[int]:
        cache = self._cache
        if len(cache) > 200_000:  # bounded: text with endless distinct words must not grow memory
            cache.clear()
        out: list[int] = []
        for piece in self._re.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self._encode_piece(piece.encode("utf-8"))
            out.extend(ids)
        return out

    def _encode_piece(self, piece: bytes) -> list[int]:
        enc = self._encoder
        if self.ignore_merges:
            whole = enc.get(piece)
            if whole is not None:
                return [whole]
        if self.rank_rule:
            def join(x: bytes, y: bytes) -> tuple[int, bytes] | None:
                r = enc.get(x + y)
                return None if r is None else (r, x + y)

            return [enc[p] for p in _merge_parts([piece[i:i + 1] for i in range(len(piece))], join)]
        pair_rank = self._pair_rank
        return _merge_parts([self._byte_ids[c] for c in piece], lambda x, y: pair_rank.get((x, y)))

    # -- decoding ----------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        dec = self._decoder
        ids = list(ids)
        try:
            return b"".join([dec[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in dec)
            raise LmstackError(f"token id {bad!r} is not in the vocab (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 (a character cut by the ids) become U+FFFD."""
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (Hugging Face format; HF ``tokenizers`` loads it with identical ids) and
        ``tokenizer_vocab.txt`` (human-readable: one token per line). Returns the tokenizer.json path."""
        from lmstack.runs import atomic_write_text
        from lmstack.tokenizer.hf import to_hf_json

        directory = Path(directory)
        path = atomic_write_text(directory / "tokenizer.json", to_hf_json(self))
        atomic_write_text(directory / "tokenizer_vocab.txt", self.vocab_text())
        return path

    def vocab_text(self) -> str:
        """One line per token: id, then its bytes shown printable (``\\xNN`` for the rest)."""
        lines = [f"# lmstack byte-level BPE, {self.vocab_size} tokens, pattern {self.pattern}"]
        names = {i: s for s, i in self.special_tokens.items()}
        for i in sorted(self._decoder):
            shown = f"{names[i]} (special)" if i in names else render_bytes(self._decoder[i])
            lines.append(f"{i}\t{shown}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        rule = "tiktoken rank rule" if self.rank_rule else "HF merge-list rule"
        return f"BPETokenizer(vocab_size={self.vocab_size}, specials={len(self.special_tokens)}, {rule})"


def render_bytes(b: bytes) -> str:
    """Token bytes as readable text: printable characters as is, a space as U+2581, the rest escaped."""
    s = b.decode("utf-8", errors="backslashreplace")
    return "".join("\u2581" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in s)


def _clean_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: replace them with U+FFFD (tiktoken does the same)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
