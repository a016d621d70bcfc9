"""The fast encode path and tiktoken rank files.

Our BPE encodes with tiktoken's rule (token id = rank, join the lowest-ranked pair), so a
``tiktoken.Encoding`` built from our ``bytes -> id`` table and split pattern gives the same ids as the
Python path, at tiktoken's speed (Rust, and ``encode_batch`` across threads).

Rank files (``*.tiktoken``) hold one ``base64(token bytes) rank`` line per ordinary token, the format
tiktoken's own encodings ship in. They store neither the split pattern nor the special tokens, so loading
one takes them as arguments.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.errors import DataError
from lmstack.tokenizer.base import DEFAULT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from lmstack.tokenizer.bpe import BPETokenizer


def build_tiktoken(tok: BPETokenizer) -> Any:
    """A ``tiktoken.Encoding`` with ``tok``'s ranks, pattern and special tokens; None if tiktoken is absent
    or refuses them (e.g. a pattern its regex engine cannot compile)."""
    try:
        import tiktoken
    except ImportError:  # pragma: no cover - tiktoken is a dependency, but the Python path still works
        return None
    try:
        return tiktoken.Encoding(name=f"lmstack-bpe-{tok.vocab_size}", pat_str=tok.pattern,
                                 mergeable_ranks=tok.ranks, special_tokens=dict(tok.special_tokens))
    except (ValueError, AssertionError):
        return None


def save_tiktoken(tok: BPETokenizer, path: str | os.PathLike) -> Path:
    """Write ``tok``'s ranks as a tiktoken rank file (atomically)."""
    from lmstack.runs import atomic_write_text

    if not tok.rank_rule:
        raise DataError("this tokenizer uses Hugging Face's merge-list rule; tiktoken's rank rule would "
                        "encode differently, so it has no tiktoken rank file")
    lines = [f"{base64.b64encode(b).decode()} {i}" for b, i in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    ranks: dict[bytes, int] = {}
    try:
        text = path.read_text(encoding="ascii")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise DataError(f"{path}: not a tiktoken rank file (expected 'base64 rank' lines)") from None
    if not ranks:
        raise DataError(f"{path}: the rank file is empty")
    return ranks


def load_tiktoken(path: str | os.PathLike, pattern: str = "gpt4",
                  special_tokens: dict[str, int] | list[str] | None = None) -> BPETokenizer:
    """A :class:`BPETokenizer` from a tiktoken rank file. ``special_tokens``: a ``name -> id`` dict, or names
    given ids after the last rank (default: lmstack's specials)."""
    from lmstack.tokenizer.bpe import BPETokenizer

    ranks = read_tiktoken_ranks(path)
    vocab = {i: b for b, i in ranks.items()}
    if len(vocab) != len(ranks):
        raise DataError(f"{path}: two tokens share a rank")
    if special_tokens is None or isinstance(special_tokens, (list, tuple)):
        names = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        special_tokens = {s: max(vocab) + 1 + k for k, s in enumerate(names)}
    return BPETokenizer(vocab, pattern=pattern, special_tokens=special_tokens)

