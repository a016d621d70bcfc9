"""The ``Tokenizer`` protocol every tokenizer in lmstack follows, and the shared constants.

Three implementations sit behind it: our byte-level BPE (:class:`lmstack.tokenizer.bpe.BPETokenizer`, with a
tiktoken fast path), and any other Hugging Face ``tokenizer.json`` wrapped through the ``tokenizers``
library (:class:`lmstack.tokenizer.hf.HFTokenizer`). Callers see ids, bytes and text only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol, runtime_checkable

# Pre-tokenization patterns. Both are written so that Python's ``regex``, Oniguruma (HF tokenizers) and
# fancy-regex (tiktoken) split text identically: no ``{m,n}+`` (Oniguruma reads it as a nested repeat, not
# a possessive one), so GPT-4's digit rule splits "12345" into "123" "45" in all three engines.
PATTERNS: dict[str, str] = {
    # GPT-2: contractions, optional-space + letters / numbers / other, whitespace runs.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # GPT-4 (cl100k): case-insensitive contractions, one leading non-letter glued to a word, numbers in
    # groups of at most 3 digits, punctuation runs with their trailing newlines, newline runs apart.
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
            r"""\s*[\r\n]|\s+(?!\S)|\s+""",
}

# Role markers of the chat template (see lmstack.tokenizer.chat) follow the document markers.
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)

AllowedSpecial = Literal["all"] | Iterable[str] | None


def resolve_pattern(pattern: str) -> str:
    """``"gpt2"``/``"gpt4"`` -> the regex; any other string is taken as a regex and must compile."""
    from lmstack.errors import ConfigError

    if pattern in PATTERNS:
        return PATTERNS[pattern]
    import regex

    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ConfigError(f"pattern: not a valid regex ({e}); use 'gpt2', 'gpt4' or a regex") from None
    if not pattern:
        raise ConfigError("pattern: empty; use 'gpt2', 'gpt4' or a regex")
    return pattern


@runtime_checkable
class Tokenizer(Protocol):
    """What every lmstack tokenizer offers.

    ``encode`` never turns special-token strings found in the text into special ids unless asked
    (``allowed_special="all"`` or a set of token strings): text from users cannot forge an ``<|eos|>``.
    Special tokens are added by the code that builds sequences (``bos_id``/``eos_id``, the chat template).
    """

    special_tokens: dict[str, int]

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    def encode(self, text: str, *, allowed_special: AllowedSpecial = None) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = None) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def special_ids(special_tokens: dict[str, int], *names: str) -> int | None:
    """The id of the first of ``names`` that is a special token, else None."""
    for name in names:
        if name in special_tokens:
            return special_tokens[name]
    return None


BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<|startoftext|>", "[CLS]", "<bos>")
EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|im_end|>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


class SpecialTokenIds:
    """``bos_id``/``eos_id``/``pad_id`` found by their usual names in ``self.special_tokens`` (every tokenizer)."""

    special_tokens: dict[str, int]

    @property
    def bos_id(self) -> int | None:
        return special_ids(self.special_tokens, *BOS_NAMES)

    @property
    def eos_id(self) -> int | None:
        return special_ids(self.special_tokens, *EOS_NAMES)

    @property
    def pad_id(self) -> int | None:
        return special_ids(self.special_tokens, *PAD_NAMES)


def split_specials(text: str, allowed: AllowedSpecial, special_tokens: dict[str, int]) -> list[str | int]:
    """Cut ``text`` at the allowed special-token strings: plain text segments and special ids, in order.

    ``allowed=None`` (the default everywhere) keeps the whole text plain, so ``"<|eos|>"`` typed by a user
    is encoded as ordinary bytes; ``"all"`` allows every special token; a set allows those named.
    """
    if not allowed or not special_tokens:
        return [text] if text else []
    names = list(special_tokens) if allowed == "all" else [s for s in allowed if s in special_tokens]
    unknown = [] if allowed == "all" else [s for s in allowed if s not in special_tokens]
    if unknown:
        from lmstack.errors import LmstackError

        raise LmstackError(f"allowed_special: {', '.join(map(repr, unknown))} not special tokens of this tokenizer")
    if not names or not any(n in text for n in names):
        return [text] if text else []
    import regex

    # Longest first, so "<|end|>" never shadows a longer token that starts the same way.
    pat = regex.compile("(" + "|".join(regex.escape(n) for n in sorted(names, key=len, reverse=True)) + ")")
    out: list[str | int] = []
    for i, part in enumerate(pat.split(text)):
        if i % 2:
            out.append(special_tokens[part])
        elif part:
            out.append(part)
    return out
