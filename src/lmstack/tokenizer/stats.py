"""Tokenizer statistics on a text sample: compression, vocabulary usage, longest tokens, round trip."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

from lmstack.errors import DataError
from lmstack.tokenizer.base import Tokenizer
from lmstack.tokenizer.bpe import iter_texts, render_bytes


def tokenizer_stats(tokenizer: Tokenizer, inputs: Iterable[str | os.PathLike] | str | os.PathLike,
                    max_chars: int = 20_000_000, top: int = 10) -> dict[str, Any]:
    """Measure ``tokenizer`` on the documents of ``inputs`` (text items or paths; at most ``max_chars``).

    Returns a JSON-ready dict: ``bytes_per_token`` and ``chars_per_token`` (compression, higher is better),
    ``vocab_used`` (distinct ids seen) and ``vocab_usage`` (their fraction of the vocab), ``round_trip``
    (fraction of documents with ``decode(encode(doc)) == doc``), the most frequent and the longest tokens.
    """
    docs: list[str] = []
    n_chars = 0
    for doc in iter_texts(inputs):
        docs.append(doc[: max_chars - n_chars])
        n_chars += len(docs[-1])
        if n_chars >= max_chars:
            break
    if not n_chars:
        raise DataError("no text to measure the tokenizer on")
    encoded = tokenizer.encode_batch(docs)
    counts: Counter = Counter()
    for ids in encoded:
        counts.update(ids)
    n_tokens = sum(len(ids) for ids in encoded)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    exact = sum(tokenizer.decode(ids) == d for ids, d in zip(encoded, docs))
    specials = set(tokenizer.special_tokens.values())
    lengths = []
    for i in range(tokenizer.vocab_size):
        if i not in specials:
            try:
                lengths.append((len(tokenizer.token_bytes(i)), i))
            except Exception:  # a hole in a foreign vocab
                continue
    lengths.sort(key=lambda t: (-t[0], t[1]))
    return {
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": len(specials),
        "documents": len(docs),
        "chars": n_chars,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
        "chars_per_token": round(n_chars / max(n_tokens, 1), 4),
        "vocab_used": len(counts),
        "vocab_usage": round(len(counts) / tokenizer.vocab_size, 4),
        "round_trip": round(exact / len(docs), 4),
        "most_frequent": [[render_bytes(tokenizer.token_bytes(i)), c] for i, c in counts.most_common(top)],
        "longest": [[render_bytes(tokenizer.token_bytes(i)), n] for n, i in lengths[:top]],
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a short Markdown block (for the CLI and the speedrun report)."""
    lines = [
        "| measure | value |", "| --- | --- |",
        f"| vocab size | {stats['vocab_size']} ({stats['special_tokens']} special) |",
        f"| sample | {stats['documents']} documents, {stats['bytes']:,} bytes, {stats['tokens']:,} tokens |",
        f"| bytes / token | {stats['bytes_per_token']:.3f} |",
        f"| chars / token | {stats['chars_per_token']:.3f} |",
        f"| vocab used | {stats['vocab_used']} ({100 * stats['vocab_usage']:.1f}%) |",
        f"| exact round trip | {100 * stats['round_trip']:.1f}% of documents |",
    ]
    longest = ", ".join(f"`{t}`" for t, _ in stats["longest"])
    frequent = ", ".join(f"`{t}`" for t, _ in stats["most_frequent"])
    return "\n".join(lines) + f"\n\nlongest tokens: {longest}\n\nmost frequent: {frequent}\n"
