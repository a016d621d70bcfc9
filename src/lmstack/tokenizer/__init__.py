"""lmstack.tokenizer: byte-level BPE (train, encode, decode), a tiktoken fast path, Hugging Face interop,
and the chat template.

    from lmstack.tokenizer import train_bpe, load_tokenizer

    tok = train_bpe(["corpus/"], vocab_size=8192)       # paths are Path objects, str items are text
    ids = tok.encode("Hello world")                     # special strings stay text unless allowed_special
    tok.save("run/")                                    # run/tokenizer.json, loadable by HF tokenizers
    tok = load_tokenizer("run/")                        # ours, any HF tokenizer.json, or a .tiktoken file
"""

from __future__ import annotations

import os
from pathlib import Path

from lmstack.errors import DataError
from lmstack.tokenizer.base import DEFAULT_SPECIAL_TOKENS, PATTERNS, Tokenizer
from lmstack.tokenizer.bpe import BPETokenizer, train_bpe

__all__ = ["BPETokenizer", "DEFAULT_SPECIAL_TOKENS", "PATTERNS", "Tokenizer", "load_chat_template", "load_tokenizer",
           "train_bpe"]


def load_chat_template(path: str | os.PathLike):
    """The Hugging Face chat template of a folder or file; see :mod:`lmstack.tokenizer.template`."""
    from lmstack.tokenizer.template import load_chat_template as load

    return load(path)


def load_tokenizer(path: str | os.PathLike, *, pattern: str = "gpt4",
                   special_tokens: dict[str, int] | list[str] | None = None) -> Tokenizer:
    """Load a tokenizer from a run directory or folder holding ``tokenizer.json``, a ``tokenizer.json`` file
    (ours or any Hugging Face one), or a tiktoken rank file (``*.tiktoken``, which needs ``pattern`` and
    takes ``special_tokens``; both are ignored for tokenizer.json, which carries its own).

    A plain byte-level BPE comes back as :class:`BPETokenizer`; WordPiece, Unigram and other BPE variants as
    :class:`lmstack.tokenizer.hf.HFTokenizer`. Missing or corrupt files raise DataError naming the file.
    """
    p = Path(path)
    if p.is_dir():
        f = p / "tokenizer.json"
        if not f.is_file():
            raise DataError(f"{p}: no tokenizer.json in this folder")
    elif p.is_file():
        f = p
    else:
        raise DataError(f"{p}: no such tokenizer file or folder")
    if f.suffix == ".tiktoken":
        from lmstack.tokenizer.fast import load_tiktoken

        return load_tiktoken(f, pattern=pattern, special_tokens=special_tokens)
    from lmstack.tokenizer.hf import from_hf_json

    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{f}: not a tokenizer.json (not UTF-8 text)") from None
    if not text.strip():
        raise DataError(f"{f}: the tokenizer file is empty")
    return from_hf_json(text, str(f))
