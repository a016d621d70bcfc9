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


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds tokenizer files :func:`load_tokenizer` reads."""
    p = Path(folder)
    return p.is_dir() and ((p / "tokenizer.json").is_file() or
                           ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()) or
                           any(p.glob("*.tiktoken")))


def load_tokenizer(path: str | os.PathLike, *, pattern: str = "gpt4",
                   special_tokens: dict[str, int] | list[str] | None = None) -> Tokenizer:
    """Load a tokenizer from a folder or file:

    - ``tokenizer.json`` (ours or any Hugging Face one), the file or a folder holding it;
    - a folder with GPT-2-style ``vocab.json`` + ``merges.txt`` (HF's slow byte-level BPE files; their added
      tokens come from ``tokenizer_config.json``/``special_tokens_map.json``, else ``<|endoftext|>``);
    - a tiktoken rank file (``*.tiktoken``, or a folder holding one), which needs ``pattern`` and takes
      ``special_tokens``; both are ignored for tokenizer.json, which carries its own.

    In a folder, ``tokenizer_config.json``'s ``add_bos_token`` (when set) overrides the BOS rule read from
    tokenizer.json's post-processor (``tokenizer.add_bos``: whether the tokenizer's own default puts BOS first).
    A plain byte-level BPE comes back as :class:`BPETokenizer`; WordPiece, Unigram and other BPE variants as
    :class:`lmstack.tokenizer.hf.HFTokenizer`. Missing or corrupt files raise DataError naming the file.
    """
    p = Path(path)
    folder = None
    if p.is_dir():
        folder = p
        f = p / "tokenizer.json"
        if not f.is_file():
            if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                from lmstack.tokenizer.hf import from_vocab_merges

                return _with_config(from_vocab_merges(p), p)
            ranks = sorted(p.glob("*.tiktoken"))
            if not ranks:
                raise DataError(f"{p}: no tokenizer in this folder (expected tokenizer.json, vocab.json + "
                                f"merges.txt, or a .tiktoken file)")
            f = ranks[0]
    elif p.is_file():
        f = p
    else:
        raise DataError(f"{p}: no such tokenizer file or folder")
    if f.suffix == ".tiktoken":
        from lmstack.tokenizer.fast import load_tiktoken

        if special_tokens is None and folder is not None:
            # A folder's tokenizer_config/special_tokens_map names its specials (ids follow the last rank).
            from lmstack.tokenizer.template import special_tokens_of

            special_tokens = list(dict.fromkeys(special_tokens_of(folder).values())) or None
        return load_tiktoken(f, pattern=pattern, special_tokens=special_tokens)
    from lmstack.tokenizer.hf import from_hf_json

    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{f}: not a tokenizer.json (not UTF-8 text)") from None
    if not text.strip():
        raise DataError(f"{f}: the tokenizer file is empty")
    tok = from_hf_json(text, str(f))
    return _with_config(tok, folder) if folder is not None else tok


def _with_config(tok: Tokenizer, folder: Path) -> Tokenizer:
    """Apply ``tokenizer_config.json``'s ``add_bos_token`` to ``tok.add_bos``."""
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        from lmstack.tokenizer.template import read_json_config

        value = read_json_config(cfg_file).get("add_bos_token")
        if isinstance(value, bool):
            tok.add_bos = value and tok.bos_id is not None
    return tok
