"""What a training run reads: the tokenizer, and token-shard folders for ``data.train`` / ``data.valid``.

A shard folder (``lmstack data prepare``) is used in place. Text inputs (files, folders, globs) are
tokenized into ``RUN/data/train`` and ``RUN/data/valid`` once, and reused while the input files, text
field, tokenizer and split are unchanged.

The held-out rule for text inputs without ``data.valid``: a document is held out when
``lmstack.data.split.is_heldout(text, data.valid_fraction, data.split_seed)``; held-out documents are
packed into ``RUN/data/valid`` and never trained on, the rest into ``RUN/data/train``. A whole document
lands on one side, so no text straddles the boundary. Only a pre-packed shard folder without a validation
set falls back to the loader's held-out tail of blocks (``BlockLoader(holdout=...)``), since its
documents are no longer separable.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError
from lmstack.runs import read_json
from lmstack.train import distributed as D
from lmstack.train.config import TrainConfig


def byte_tokenizer():
    """UTF-8 bytes as tokens (ids 0-255) plus ``<|eos|>`` = 256: a tokenizer that needs no training."""
    from lmstack.tokenizer import BPETokenizer

    return BPETokenizer([bytes([i]) for i in range(256)], special_tokens={"<|eos|>": 256}, merges=[])


def load_train_tokenizer(spec: str):
    """``"bytes"`` or a ``tokenizer.json`` (or a folder holding one)."""
    if spec == "bytes":
        return byte_tokenizer()
    from lmstack.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def _tokenizer_fingerprint(spec: str) -> str:
    if spec == "bytes":
        return "bytes"
    p = Path(spec)
    f = p / "tokenizer.json" if p.is_dir() else p
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else spec


def is_shard_dir(inputs: list[str]) -> bool:
    return len(inputs) == 1 and (Path(inputs[0]) / "index.json").is_file()


def resolve_split(inputs: list[str], out: Path, tokenizer: Any, cfg: TrainConfig, env: D.DistEnv,
                  side: str | None = None, tokenizer_key: str | None = None) -> Path:
    """A shard folder for ``inputs``: the folder itself, or text inputs tokenized into ``out``.

    ``side`` = ``"train"`` or ``"valid"`` keeps only the documents on that side of the held-out rule
    (``data.valid_fraction``, ``data.split_seed``); None keeps every document. ``tokenizer_key`` names the
    tokenizer in the cache key (default: a hash of ``data.tokenizer``'s file).
    """
    if is_shard_dir(inputs):
        return Path(inputs[0])
    from lmstack.sources import expand_paths

    # the files' sizes and modification times, so rewritten inputs are tokenized again
    files = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in expand_paths(inputs)]
    meta: dict[str, Any] = {"inputs": files, "text_field": cfg.data.text_field,
                            "tokenizer": tokenizer_key or _tokenizer_fingerprint(cfg.data.tokenizer)}
    if side is not None:
        meta["split"] = {"side": side, "valid_fraction": cfg.data.valid_fraction, "seed": cfg.data.split_seed}
    fresh = (out / "index.json").is_file() and read_json(out / "index.json").get("meta") == meta
    if env.is_main and not fresh:
        from lmstack.data.pack import pack_texts
        from lmstack.data.split import is_heldout
        from lmstack.sources import iter_documents

        print(f"[train] tokenizing {', '.join(inputs)} -> {out}", file=sys.stderr)
        docs = iter_documents(inputs, cfg.data.text_field)
        if side is not None:
            want = side == "valid"
            frac, seed = cfg.data.valid_fraction, cfg.data.split_seed
            docs = (d for d in docs if is_heldout(d, frac, seed) == want)
        pack_texts(docs, tokenizer, out, meta=meta, workers=cfg.data.workers)
    D.barrier(env)
    return out


@dataclass
class Splits:
    train: Path
    valid: Path | None      # None: no validation set (see ``holdout``)
    holdout: float          # the loader's held-out tail of ``train`` (pre-packed shards without a valid set only)


def resolve_splits(cfg: TrainConfig, root: Path, tokenizer: Any, env: D.DistEnv,
                   tokenizer_key: str | None = None) -> Splits:
    """The train and validation shard folders of ``cfg.data`` (text inputs packed under ``root``)."""
    data = cfg.data

    def pack(inputs: list[str], name: str, side: str | None = None) -> Path:
        return resolve_split(inputs, root / name, tokenizer, cfg, env, side, tokenizer_key)

    if not data.train:
        raise ConfigError("data.train: name a shard folder (lmstack data prepare) or text files/folders/globs")
    if data.valid:
        return Splits(pack(data.train, "train"), pack(data.valid, "valid"), 0.0)
    if is_shard_dir(data.train) or data.valid_fraction == 0:
        return Splits(pack(data.train, "train"), None, data.valid_fraction)
    train, valid = pack(data.train, "train", "train"), pack(data.train, "valid", "valid")
    if read_json(valid / "index.json").get("documents", 0) == 0:
        if env.is_main:
            print(f"[train] warning: no document of data.train fell in the held-out data.valid_fraction="
                  f"{data.valid_fraction}; no validation (give data.valid or raise data.valid_fraction)",
                  file=sys.stderr)
        return Splits(train, None, 0.0)
    return Splits(train, valid, 0.0)


@dataclass
class RunData:
    train: Path
    valid: Path | None
    holdout: float          # the held-out fraction of ``train`` used for validation when ``valid`` is None
    vocab_size: int         # the token ids' range (the tokenizer's vocab)
    tokenizer: Any
    has_valid: bool = True  # False: text inputs whose held-out share came out empty; no validation


def prepare_data(cfg: TrainConfig, run: Path, env: D.DistEnv, tokenizer: Any = None,
                 tokenizer_key: str | None = None) -> RunData:
    """The run's tokenizer (``data.tokenizer`` unless given) and shard folders under ``RUN/data``."""
    from lmstack.data.pack import open_shards

    tokenizer = tokenizer if tokenizer is not None else load_train_tokenizer(cfg.data.tokenizer)
    splits = resolve_splits(cfg, run / "data", tokenizer, env, tokenizer_key)
    has_valid = splits.valid is not None or splits.holdout > 0 or cfg.data.valid_fraction == 0
    vocab = open_shards(splits.train).vocab_size
    return RunData(splits.train, splits.valid, splits.holdout, vocab, tokenizer, has_valid)


def data_signature(data: RunData) -> list[Any]:
    """What identifies the shards a run trains and validates on (for the config fingerprint)."""
    from lmstack.data.pack import open_shards

    sig = []
    for path in (data.train, data.valid):
        if path is not None:
            index = open_shards(path).index
            sig.append([index["tokens"], index["documents"], index.get("meta")])
    return sig
