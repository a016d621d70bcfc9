"""Text in, text out, on top of the id-level engine; streaming that never splits a UTF-8 character.

    from lmstack.infer.text import generate_text, stream_text, load_run
    model, tok = load_run("runs/speedrun")
    print(generate_text(model, tok, "Once upon a time", GenerationConfig(max_new_tokens=40)))
    for delta in stream_text(model, tok, "Once upon a time", cfg):
        print(delta, end="", flush=True)

Conventions: the stop ids default to the tokenizer's EOS (and ``<|end|>`` in chat); special tokens are
not printed; text is cut before a stop string (the ids keep it, as in ``transformers``). An empty
prompt starts from the tokenizer's BOS id, else its EOS id (the document separator the data packer
puts between documents), else is refused.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.infer.config import GenerationConfig
from lmstack.infer.engine import generate_result, stream

END_OF_TURN = "<|end|>"


class TextStream:
    """Token ids in, text deltas out: whole UTF-8 characters only, special tokens skipped, and nothing at
    or after the first stop string (text that might begin one is held back until it is decided)."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stop_strings)
        self.skip = set(skip_ids)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.stopped = False

    def push(self, ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        data = b"".join(self.tokenizer.token_bytes(i) for i in ids if i not in self.skip)
        self.pending += self.decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0 if final else max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out


def _with_defaults(tokenizer: Any, config: GenerationConfig | None, extra_stop: Sequence[int] = ()) -> GenerationConfig:
    cfg = config or GenerationConfig()
    eos = list(cfg.eos_token_id) if cfg.eos_token_id is not None else (
        [tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    eos += [i for i in extra_stop if i not in eos]
    pad = cfg.pad_token_id
    if pad is None:
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (eos[0] if eos else None)
    return cfg.replace(eos_token_id=eos or None, pad_token_id=pad)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Ids of a text prompt (or ids as given); an empty text starts from BOS, else EOS."""
    if not isinstance(prompt, str):
        return list(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise LmstackError("empty prompt, and the tokenizer has no BOS or EOS token to start from")
        ids = [start]
    return ids


def _skip_ids(tokenizer: Any, cfg: GenerationConfig) -> set[int]:
    return set(tokenizer.special_tokens.values()) | set(cfg.eos_token_id or [])


def generate_text(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str], config: GenerationConfig | None = None,
                  *, draft_model: nn.Module | None = None) -> str | list[str]:
    """Completions of ``prompts`` (a string gives a string; a list gives a list, ``num_return_sequences``
    per prompt, grouped by prompt). Prompts of different lengths are batched with left padding."""
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    if not items:
        raise LmstackError("no prompts given")
    cfg = _with_defaults(tokenizer, config)
    res = generate_result(model, [encode_prompt(tokenizer, p) for p in items], cfg, tokenizer=tokenizer,
                          draft_model=draft_model)
    skip = _skip_ids(tokenizer, cfg)
    texts = []
    for row in range(res.sequences.shape[0]):
        ts = TextStream(tokenizer, cfg.stop_strings, skip)
        texts.append(ts.push(res.new_tokens(row)) + ts.finish())
    return texts[0] if single and len(texts) == 1 else texts


def stream_text(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                *, draft_model: nn.Module | None = None, stop_ids: Sequence[int] = ()) -> Iterator[str]:
    """Text deltas of one completion as they are decoded (never half a character, never a stop string)."""
    cfg = _with_defaults(tokenizer, config, stop_ids)
    steps = stream(model, [encode_prompt(tokenizer, prompt)], cfg, tokenizer=tokenizer, draft_model=draft_model)
    return _deltas(steps, TextStream(tokenizer, cfg.stop_strings, _skip_ids(tokenizer, cfg)))


def _deltas(steps: Iterator[list[list[int]]], ts: TextStream) -> Iterator[str]:
    for lists in steps:
        delta = ts.push(lists[0])
        if delta:
            yield delta
        if ts.stopped:
            steps.close()
            return
    tail = ts.finish()
    if tail:
        yield tail


def chat_stream(model: nn.Module, tokenizer: Any, messages: Sequence[Mapping[str, str]],
                config: GenerationConfig | None = None, *, draft_model: nn.Module | None = None) -> Iterator[str]:
    """The assistant's reply to ``messages`` (lmstack chat template), streamed; ends at ``<|end|>``."""
    from lmstack.tokenizer.chat import render_chat

    ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
    config = chat_config(tokenizer, config)
    end = tokenizer.special_tokens.get(END_OF_TURN)
    return stream_text(model, tokenizer, ids, config, draft_model=draft_model,
                       stop_ids=[end] if end is not None else [])


def chat_config(tokenizer: Any, config: GenerationConfig | None = None) -> GenerationConfig:
    """``config`` for an assistant turn: stops at ``<|end|>`` and never emits the other special tokens
    (a role marker or ``<|bos|>`` inside a reply would break the conversation's format)."""
    config = config or GenerationConfig()
    end = tokenizer.special_tokens.get(END_OF_TURN)
    others = sorted(set(config.suppress_tokens) | {i for i in tokenizer.special_tokens.values() if i != end})
    eos = list(config.eos_token_id or [])
    if end is not None and end not in eos:
        eos.append(end)
    return config.replace(suppress_tokens=others, eos_token_id=eos or None)


def find_model_folder(folder: Path, prefer: Sequence[str] = ("pretrain", "chat_model")) -> Path:
    """The folder holding the model of a run: the run itself, ``model/`` or ``final/``, else (for a speedrun
    directory) the first of ``prefer`` that holds one. An adapter-only fine-tuning run is named as such."""
    import json

    for cand in (folder, folder / "model", folder / "final", *(folder / p for p in prefer)):
        if (cand / "model_config.json").is_file():
            return cand
        hf_config = cand / "config.json"
        if hf_config.is_file():
            try:
                if "model_type" in json.loads(hf_config.read_text(encoding="utf-8")):
                    return cand
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    if (folder / "adapter_config.json").is_file():
        raise LmstackError(f"{folder}: this fine-tuning run holds an adapter, not a model; merge it first: "
                           f"lmstack finetune merge {folder} --out {folder}/merged")
    raise LmstackError(f"{folder}: no model found (expected model_config.json or a Hugging Face config.json)")


def load_run(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
             prefer: Sequence[str] = ("pretrain", "chat_model")) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a run directory or model folder: lmstack format (``model_config.json``) or
    Hugging Face (``config.json``), with ``tokenizer.json`` beside it (or one folder up). For a speedrun
    directory, ``prefer`` orders its model folders (``chat`` prefers the fine-tuned ``chat_model``)."""
    from lmstack.model import hf, load
    from lmstack.runtime import resolve_device
    from lmstack.tokenizer import load_tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise LmstackError(f"{folder}: no such run directory")
    cand = find_model_folder(folder, prefer)
    dev = resolve_device(device)
    model = load(cand, device=dev, dtype=dtype) if (cand / "model_config.json").is_file() else \
        hf.load(cand, dtype=dtype, device=dev)
    for tdir in (cand, folder, cand.parent, folder.parent):
        if (tdir / "tokenizer.json").is_file():
            return model.eval(), load_tokenizer(tdir)
    raise LmstackError(f"{folder}: no tokenizer.json next to the model")
