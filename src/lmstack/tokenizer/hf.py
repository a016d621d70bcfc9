"""Hugging Face ``tokenizer.json`` in and out, and foreign tokenizers behind our protocol.

Export (``to_hf_json``): a byte-level BPE whose token strings use GPT-2's byte-to-character table, a
``Split`` pre-tokenizer with our regex followed by ``ByteLevel`` (no regex of its own), the special tokens
as added tokens. HF applies merges by list position, tiktoken by the rank of the joined bytes; to make HF
follow the rank rule we list, for every token in id order, *each* way of writing it as two tokens
("the" = "t"+"he" and "th"+"e"), and set ``ignore_merges`` (a piece that is a token is taken whole, as
tiktoken does). HF then joins exactly the pairs tiktoken joins, in the same order.

Import (``from_hf_json``): a plain byte-level BPE (no normalizer, ByteLevel pre-tokenizer optionally after
one ``Split``, no dropout/suffixes/byte-fallback, only special added tokens) becomes a
:class:`~lmstack.tokenizer.bpe.BPETokenizer` with HF's merge-list rule, or with the rank rule when its
merges are exactly the list we export. Anything else (WordPiece, Unigram, BPE with a normalizer, ...) is
wrapped as :class:`HFTokenizer`, which calls the ``tokenizers`` library. Post-processors (templates that
add ``[CLS]``/``<s>``) are not applied: ``encode`` returns the text's ids only, everywhere in lmstack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmstack.errors import DataError, LmstackError
from lmstack.tokenizer.base import (
    PATTERNS,
    AllowedSpecial,
    SpecialTokenIds,
    split_specials,
)
from lmstack.tokenizer.bpe import BPETokenizer


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the other bytes to code points 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def bytes_to_str(b: bytes) -> str:
    table = byte_to_char()
    return "".join(table[x] for x in b)


def str_to_bytes(s: str) -> bytes | None:
    table = char_to_byte()
    try:
        return bytes(table[c] for c in s)
    except KeyError:
        return None


def rank_rule_merges(vocab: dict[int, bytes]) -> list[tuple[int, int]]:
    """Every split of every multi-byte token into two tokens, tokens in id order, splits left to right."""
    encoder = {b: i for i, b in vocab.items()}
    merges = []
    for i in sorted(vocab):
        b = vocab[i]
        for k in range(1, len(b)):
            left, right = encoder.get(b[:k]), encoder.get(b[k:])
            if left is not None and right is not None:
                merges.append((left, right))
    return merges


def to_hf_dict(tok: BPETokenizer) -> dict[str, Any]:
    vocab = {i: tok.token_bytes(i) for i in range(tok.vocab_size) if i not in tok.special_tokens.values()}
    merges = rank_rule_merges(vocab) if tok.rank_rule else list(tok.merges or [])
    model_vocab = {bytes_to_str(b): i for i, b in sorted(vocab.items())}
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    if [i for _, i in specials] != list(range(len(vocab), len(vocab) + len(specials))):
        # HF numbers added tokens that are missing from the model vocab after it; specials that sit
        # elsewhere (ids 0, 1 in HF-trained files) must be in the model vocab to keep their ids.
        model_vocab.update({s: i for s, i in specials if s not in model_vocab})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": bool(tok.ignore_merges),
            "vocab": model_vocab,
            "merges": [[bytes_to_str(vocab[a]), bytes_to_str(vocab[b])] for a, b in merges],
        },
    }


def to_hf_json(tok: BPETokenizer) -> str:
    return json.dumps(to_hf_dict(tok), ensure_ascii=False, indent=None) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Import


def _split_pattern(pre: Any) -> str | None:
    """The regex of a byte-level pre-tokenizer we reproduce exactly, else None."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return PATTERNS["gpt2"] if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 2:
        split, byte_level = pre["pretokenizers"]
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in (split.get("pattern") or {}) and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


def bos_from_post_processor(post: Any, special_tokens: dict[str, int]) -> bool:
    """Whether a ``tokenizer.json`` post-processor puts a BOS-like special token before a single sequence
    (``TemplateProcessing`` whose ``single`` starts with a special token, possibly inside a ``Sequence``;
    ``BertProcessing``/``RobertaProcessing`` add ``[CLS]``/``<s>``)."""
    if not isinstance(post, dict):
        return False
    kind = post.get("type")
    if kind == "Sequence":
        return any(bos_from_post_processor(p, special_tokens) for p in post.get("processors") or [])
    if kind in ("BertProcessing", "RobertaProcessing"):
        return True
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return False


def from_vocab_merges(folder: str | os.PathLike) -> BPETokenizer:
    """GPT-2-style ``vocab.json`` + ``merges.txt`` (HF's slow byte-level BPE) as our BPETokenizer.

    The special tokens are the named tokens of ``tokenizer_config.json``/``special_tokens_map.json`` found in
    the vocab, else ``<|endoftext|>`` when the vocab has it; ``add_prefix_space`` must be false (as GPT-2's).
    """
    from lmstack.tokenizer.template import read_json_config, special_tokens_of

    folder = Path(folder)
    vocab = read_json_config(folder / "vocab.json")
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{folder / 'merges.txt'}: not UTF-8 text") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DataError(f"{folder / 'merges.txt'} line {n}: expected two tokens separated by a space")
        merges.append(parts)
    config = read_json_config(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() \
        else {}
    if config.get("add_prefix_space"):
        raise DataError(f"{folder}: add_prefix_space=true is not supported for vocab.json + merges.txt; "
                        f"use its tokenizer.json")
    names = set(special_tokens_of(folder, config).values()) or {"<|endoftext|>"}
    added = [{"id": vocab[t], "content": t, "special": True} for t in sorted(names) if t in vocab]
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "normalizer": None,
            "decoder": {"type": "ByteLevel"}, "added_tokens": added,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    tok = byte_level_bpe_from_hf(data, str(folder / "merges.txt"))
    if tok is None:
        raise DataError(f"{folder}: vocab.json + merges.txt are not a byte-level BPE lmstack can read")
    return tok


def byte_level_bpe_from_hf(data: dict[str, Any], source: str = "tokenizer.json") -> BPETokenizer | None:
    """Our BPETokenizer for a plain byte-level BPE ``tokenizer.json`` (see the module docstring), else None."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or data.get("normalizer") is not None:
        return None
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return None
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    pattern = _split_pattern(data.get("pre_tokenizer"))
    if pattern is None:
        return None
    added = data.get("added_tokens") or []
    if any(not t.get("special") or t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    specials = {t["content"]: int(t["id"]) for t in added}
    special_set = set(specials.values())
    vocab: dict[int, bytes] = {}
    for s, i in (model.get("vocab") or {}).items():
        if i in special_set:
            continue
        b = str_to_bytes(s)
        if b is None:
            return None  # a token outside the byte alphabet: not byte-level after all
        vocab[int(i)] = b
    by_str = model.get("vocab") or {}
    merges = []
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in by_str or b not in by_str:
            raise DataError(f"{source}: merge {r} ({a!r}, {b!r}) names a token missing from the vocab")
        merges.append((by_str[a], by_str[b]))
    ignore = bool(model.get("ignore_merges", False))
    rank_rule = ignore and merges == rank_rule_merges(vocab)
    try:
        tok = BPETokenizer(vocab, pattern=pattern, special_tokens=specials, merges=merges,
                           rank_rule=rank_rule, ignore_merges=ignore)
    except LmstackError:
        return None
    tok.add_bos = bos_from_post_processor(data.get("post_processor"), specials) and tok.bos_id is not None
    return tok  # e.g. a regex our engine rejects, or missing byte tokens: leave it to the HF wrapper


class HFTokenizer(SpecialTokenIds):
    """Any tokenizer the Hugging Face ``tokenizers`` library loads, behind lmstack's Tokenizer protocol.

    ``encode`` returns the text's ids without template tokens (no ``[CLS]``/``[SEP]``) and treats special
    strings in the text as plain text unless ``allowed_special`` says otherwise, like our BPE.
    """

    def __init__(self, tok: Any, source: str | None = None):
        tok.no_padding()  # lmstack pads and truncates itself; a tokenizer.json's settings would alter ids
        tok.no_truncation()
        self._tok = tok
        self.source = source
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special
        }
        data = json.loads(tok.to_str())
        self.model_type = data["model"].get("type", "?")
        self._byte_fallback = bool(data["model"].get("byte_fallback"))
        self._bytes: dict[int, bytes] = {}
        # SentencePiece-style decoders (Metaspace, or Replace "▁" + Strip) drop the leading space of a text, so a
        # token decoded alone loses it; token_bytes then decodes after an anchor token. WordPiece etc. keep the
        # plain per-token decode.
        dec = json.dumps(data.get("decoder"), ensure_ascii=False)
        sentencepiece = "Metaspace" in dec or "\u2581" in dec
        anchor = [i for i in self._plain(["a"])[0] if i not in self.special_tokens.values()] if sentencepiece \
            else []
        self._anchor = anchor[-1] if anchor else None
        # The tokenizer's own rule for BOS (lm-evaluation-harness follows it; see lmstack.eval.lm.bos_prefix).
        self.add_bos = bos_from_post_processor(data.get("post_processor"), self.special_tokens) \
            and self.bos_id is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _plain(self, texts: list[str]) -> list[list[int]]:
        self._tok.encode_special_tokens = True  # special strings in user text stay text
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, *, allowed_special: AllowedSpecial = None) -> list[int]:
        if not isinstance(text, str):
            raise LmstackError(f"encode expects a str, got {type(text).__name__}")
        segments = split_specials(text, allowed_special, self.special_tokens)
        plain = self._plain([s for s in segments if isinstance(s, str)])
        out: list[int] = []
        k = 0
        for seg in segments:
            if isinstance(seg, int):
                out.append(seg)
            else:
                out.extend(plain[k])
                k += 1
        return out

    def encode_batch(self, texts: Sequence[str], *, allowed_special: AllowedSpecial = None) -> list[list[int]]:
        if not allowed_special:
            return self._plain(list(texts))
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        n = self.vocab_size
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < n:
                raise LmstackError(f"token id {i!r} is not in the vocab (size {n})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to a text, as a streaming decoder must print them: SentencePiece's
        ``▁the`` is b" the" (decoding it alone would strip the space), a byte-fallback ``<0x0A>`` is b"\\n"."""
        piece = self._tok.id_to_token(token_id) if isinstance(token_id, int) else None
        if piece is None:
            raise LmstackError(f"token id {token_id!r} is not in the vocab (size {self.vocab_size})")
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                out = bytes([int(piece[3:5], 16)])
            except ValueError:
                out = None
            if out is not None:
                self._bytes[token_id] = out
                return out
        if token_id in self.special_tokens.values() or self._anchor is None:
            out = self.decode([token_id]).encode("utf-8")
        else:
            # Decoders strip a leading space of the whole text only: decode after an anchor token and cut it.
            head = self.decode([self._anchor])
            both = self.decode([self._anchor, token_id])
            out = (both[len(head):] if both.startswith(head) else self.decode([token_id])).encode("utf-8")
        self._bytes[token_id] = out
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        from lmstack.runs import atomic_write_text

        return atomic_write_text(Path(directory) / "tokenizer.json", self._tok.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_type}, vocab_size={self.vocab_size}, source={self.source!r})"


def from_hf_json(text: str, source: str = "tokenizer.json") -> BPETokenizer | HFTokenizer:
    """A tokenizer from the text of a ``tokenizer.json``: ours when it is a plain byte-level BPE, else HF's."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}); is the file truncated?") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise DataError(f"{source}: not a tokenizer.json (no 'model' section)")
    ours = byte_level_bpe_from_hf(data, source)
    if ours is not None:
        return ours
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception with serde's message
        raise DataError(f"{source}: Hugging Face tokenizers cannot read it ({str(e).splitlines()[0]})") from None
    return HFTokenizer(tok, source)
