"""Text in, text out, on top of the id-level engine; streaming that never splits a UTF-8 character.

    from lmstack.infer.text import complete, complete_batch, stream_complete, load_run
    model, tok = load_run("runs/speedrun")
    c = complete(model, tok, "Once upon a time", GenerationConfig(max_new_tokens=40))
    c.text, c.finish_reason, c.n_tokens                       # ', there was ...', 'length', 40
    complete(model, tok, [{"role": "user", "content": "Hi"}], cfg).text    # a chat turn, the folder's template
    for delta in stream_complete(model, tok, "Once upon a time", cfg):
        print(delta, end="", flush=True)

:func:`complete` (and its batched and streamed forms) is the one text front-end: ``generate_text``,
``stream_text``, ``chat_stream``, the CLI's ``generate``/``chat``, the trainer's samples, fine-tuning's
chat replies and the evaluation client ``LocalLLM`` all call it, so they follow one set of rules
(:func:`prepare_prompts`): an empty prompt starts from the tokenizer's BOS id, else its EOS id (the document
separator the data packer puts between documents), else is refused; chat messages are rendered with the
folder's Hugging Face template or lmstack's own; a prompt too long for the context keeps its most recent
ids; the stop ids default to the tokenizer's EOS (and ``<|end|>`` in chat, or a Hugging Face template's
``eos_token``), more go in ``GenerationConfig.eos_token_id`` (the CLI's ``--stop-id``/``--stop-token`` add
to the EOS); special tokens are not printed; text is cut before a stop string (the ids keep it, as in
``transformers``).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer.config import GenerationConfig
from lmstack.infer.engine import generate_result, stream
from lmstack.tokenizer.chat import END_OF_TURN



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


def skip_ids(tokenizer: Any, cfg: GenerationConfig) -> set[int]:
    """Ids a reply's text leaves out: the special tokens and the stop ids."""
    return set(tokenizer.special_tokens.values()) | set(cfg.eos_token_id or [])


def stop_ids(tokenizer: Any, ids: Sequence[int] = (), tokens: Sequence[str] = ()) -> list[int]:
    """Stop ids from ids and token strings (special tokens, or strings that encode to one id), checked."""
    out = []
    n = tokenizer.vocab_size
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < n:
            raise LmstackError(f"--stop-id {i!r}: not a token id of this tokenizer (0..{n - 1})")
        out.append(i)
    for t in tokens:
        if t in tokenizer.special_tokens:
            out.append(tokenizer.special_tokens[t])
            continue
        enc = tokenizer.encode(t)
        if len(enc) != 1:
            raise LmstackError(f"--stop-token {t!r}: not a special token and encodes to {len(enc)} ids, not 1; "
                               f"use --stop-id, or --stop_strings for text")
        out.append(enc[0])
    return list(dict.fromkeys(out))


@dataclass
class Completion:
    """One completion, as every text front-end returns it."""

    text: str               # special tokens dropped, cut before the first stop string
    finish_reason: str      # "stop" (EOS, a stop id or a stop string) or "length" (max_new_tokens / context)
    n_tokens: int           # new tokens, a final stop token included
    prompt_tokens: int = 0  # prompt ids the model saw (after the empty-prompt fallback and truncation)
    truncated: int = 0      # prompt ids dropped from the left to fit the context
    token_ids: list[int] = field(default_factory=list)   # the new ids, a final stop token included
    top_logprobs: list[list[tuple[int, float]]] | None = None   # per new token: (id, log-prob) of the k best


PromptLike = str | Sequence[int] | Sequence[Mapping[str, str]]


def _is_messages(prompt: Any) -> bool:
    return not isinstance(prompt, str) and isinstance(prompt, Sequence) and len(prompt) > 0 \
        and isinstance(prompt[0], Mapping)


def prompt_budget(model: nn.Module, config: GenerationConfig) -> int | None:
    """How many prompt ids fit beside ``max_new_tokens`` in a decoder's context (None: no such limit, for an
    encoder-decoder, whose source has its own context, or a sliding window, which never fills)."""
    mcfg = model.config
    if getattr(mcfg, "arch", "decoder") != "decoder" or config.sliding_window:
        return None
    ctx = int(mcfg.max_seq_len)
    if config.max_new_tokens >= ctx:
        raise ConfigError(f"generation config field 'max_new_tokens': {config.max_new_tokens} leaves no room for a "
                          f"prompt in the model's context of {ctx} tokens; lower it")
    return ctx - config.max_new_tokens


def fitting_budget(model: nn.Module, max_new_tokens: int) -> int:
    """``max_new_tokens``, shrunk where needed to leave one prompt id in a decoder's context: for samples
    taken during a run (training, fine-tuning), which must never fail it."""
    return min(max_new_tokens, int(model.config.max_seq_len) - 1)


def prepare_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[PromptLike], config: GenerationConfig | None,
                    extra_stop: Sequence[int] = (), chat: bool | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None
                    ) -> tuple[list[list[int]], list[int], GenerationConfig]:
    """The one rule every text front-end follows: (prompt ids, ids dropped per prompt, config).

    - a string is encoded (an empty one starts from BOS, else EOS); a list of chat messages is rendered with
      the tokenizer's chat template (:func:`chat_prompt_ids`) and the config gets the end-of-turn stop
      (:func:`chat_config`); a list of ids is taken as it is;
    - stop ids default to the tokenizer's EOS (plus ``extra_stop``), the pad id to its pad, else the first stop;
    - ids the model has but the tokenizer cannot decode (padded vocabulary rows) are never generated;
    - a prompt that does not fit beside ``max_new_tokens`` in the context keeps its most recent ids.
    """
    if chat is None:   # a list whose items are dicts is a conversation (an empty list is ids, like any other)
        kinds = {_is_messages(p) for p in prompts}
        if len(kinds) > 1:
            raise LmstackError("a batch mixes chat messages and plain prompts; complete them in separate batches")
        chat = kinds == {True}
    ids = [chat_prompt_ids(tokenizer, p, tools) if chat else encode_prompt(tokenizer, p) for p in prompts]
    cfg = chat_config(tokenizer, config) if chat else (config or GenerationConfig())
    cfg = _with_defaults(tokenizer, cfg, extra_stop)
    n_tok = getattr(tokenizer, "vocab_size", None)
    n_model = getattr(model.config, "vocab_size", None)
    if n_tok is not None and n_model is not None and n_model > n_tok:
        padded = set(range(n_tok, n_model)) - set(cfg.suppress_tokens)
        cfg = cfg.replace(suppress_tokens=sorted(set(cfg.suppress_tokens) | padded))
    budget = prompt_budget(model, cfg)
    dropped = [max(0, len(p) - budget) if budget is not None else 0 for p in ids]
    ids = [p[d:] for p, d in zip(ids, dropped)]
    return ids, dropped, cfg


def complete_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[PromptLike],
                   config: GenerationConfig | None = None, *, draft_model: nn.Module | None = None,
                   stop_ids: Sequence[int] = ()) -> list[Completion]:
    """Completions of ``prompts`` (strings, id lists, or chat conversations; one kind per batch),
    ``num_return_sequences`` per prompt, grouped by prompt. Prompts of different lengths are batched with
    left padding. See :func:`prepare_prompts` for the rules (fallback, stops, truncation) and :class:`TextStream`
    for the decoding."""
    items = list(prompts)
    if not items:
        raise LmstackError("no prompts given")
    ids, dropped, cfg = prepare_prompts(model, tokenizer, items, config, stop_ids)
    res = generate_result(model, ids, cfg, tokenizer=tokenizer, draft_model=draft_model)
    skip = skip_ids(tokenizer, cfg)
    per = res.sequences.shape[0] // len(items)
    out = []
    for row in range(res.sequences.shape[0]):
        new = res.new_tokens(row)
        ts = TextStream(tokenizer, cfg.stop_strings, skip)
        tops = None
        if res.top_logprobs is not None:
            n = res.num_generated[row]
            values, idx = (t[row, :n].tolist() for t in res.top_logprobs)   # one host copy per row
            tops = [list(zip(i, v)) for v, i in zip(values, idx)]
        p = row // per
        out.append(Completion(ts.push(new) + ts.finish(), res.finish_reasons[row], res.num_generated[row],
                              len(ids[p]), dropped[p], new, tops))
    return out


def complete(model: nn.Module, tokenizer: Any, prompt: PromptLike, config: GenerationConfig | None = None, *,
             draft_model: nn.Module | None = None, stop_ids: Sequence[int] = ()) -> Completion:
    """The completion of one prompt: a string, a list of ids, or a chat conversation (a list of
    ``{"role", "content"}``, answered as the assistant). See :func:`complete_batch`."""
    if config is not None and config.num_return_sequences > 1:
        raise ConfigError("complete gives one completion; for num_return_sequences > 1 use complete_batch")
    return complete_batch(model, tokenizer, [prompt], config, draft_model=draft_model, stop_ids=stop_ids)[0]


def stream_complete(model: nn.Module, tokenizer: Any, prompt: PromptLike, config: GenerationConfig | None = None,
                    *, draft_model: nn.Module | None = None, stop_ids: Sequence[int] = ()) -> Iterator[str]:
    """:func:`complete`'s text as it is decoded (same rules, same text; never half a character, never a stop
    string)."""
    return _stream(model, tokenizer, prompt, config, draft_model, stop_ids, None)


def _stream(model: nn.Module, tokenizer: Any, prompt: PromptLike, config: GenerationConfig | None,
            draft_model: nn.Module | None, stop_ids: Sequence[int], chat: bool | None) -> Iterator[str]:
    [ids], _, cfg = prepare_prompts(model, tokenizer, [prompt], config, stop_ids, chat)
    steps = stream(model, [ids], cfg, tokenizer=tokenizer, draft_model=draft_model)
    return _deltas(steps, TextStream(tokenizer, cfg.stop_strings, skip_ids(tokenizer, cfg)))


def generate_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], config: GenerationConfig | None = None,
                         *, draft_model: nn.Module | None = None) -> list[Completion]:
    """Completions of ``prompts`` with their finish reasons (:func:`complete_batch`)."""
    return complete_batch(model, tokenizer, prompts, config, draft_model=draft_model)


def generate_text(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str], config: GenerationConfig | None = None,
                  *, draft_model: nn.Module | None = None) -> str | list[str]:
    """Completions of ``prompts`` (a string gives a string; a list gives a list, ``num_return_sequences``
    per prompt, grouped by prompt). Prompts of different lengths are batched with left padding."""
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    texts = [c.text for c in complete_batch(model, tokenizer, items, config, draft_model=draft_model)]
    return texts[0] if single and len(texts) == 1 else texts


def stream_text(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                *, draft_model: nn.Module | None = None, stop_ids: Sequence[int] = ()) -> Iterator[str]:
    """Text deltas of one completion as they are decoded (:func:`stream_complete`)."""
    return stream_complete(model, tokenizer, prompt, config, draft_model=draft_model, stop_ids=stop_ids)


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


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """The ids of a conversation up to the assistant's turn: the Hugging Face chat template of the model's
    folder when it has one (``tokenizer.chat_template``, set by :func:`load_run`; ``tools``, OpenAI function
    specs, are passed to it as transformers passes them), else lmstack's own (which has no tool syntax:
    describe tools in a system message instead, as :mod:`lmstack.serve.protocol` does)."""
    hf_template = getattr(tokenizer, "chat_template", None)
    if hf_template is not None:
        # The rendered text holds the template's special tokens (<|im_start|>, <s>, ...) as text: parse them.
        text = hf_template.render(list(messages), add_generation_prompt=True, tools=tools)
        return tokenizer.encode(text, allowed_special="all")
    if tools:
        raise LmstackError("lmstack's own chat template takes no tools: describe them in a system message")
    from lmstack.tokenizer.chat import render_chat

    if END_OF_TURN not in tokenizer.special_tokens and getattr(tokenizer, "chat_template", False) is None:
        raise LmstackError("this model has no chat template (no chat_template in its tokenizer_config.json or "
                           "chat_template.jinja, and not lmstack's chat tokens); use lmstack generate, or add "
                           "a chat template to the folder")
    return render_chat(tokenizer, messages, add_generation_prompt=True)[0]


def chat_stream(model: nn.Module, tokenizer: Any, messages: Sequence[Mapping[str, str]],
                config: GenerationConfig | None = None, *, draft_model: nn.Module | None = None) -> Iterator[str]:
    """The assistant's reply to ``messages``, streamed (:func:`stream_complete`). lmstack's template: ends at
    ``<|end|>``; a Hugging Face template: ends at the tokenizer's EOS or the template's ``eos_token`` (plus
    any stop ids in config)."""
    return _stream(model, tokenizer, messages, config, draft_model, (), True)   # even [] is a conversation


def chat_config(tokenizer: Any, config: GenerationConfig | None = None) -> GenerationConfig:
    """``config`` for an assistant turn: stops at the end-of-turn token. With lmstack's template that is
    ``<|end|>`` and the other special tokens are never emitted (a role marker or ``<|bos|>`` inside a reply
    would break the conversation's format); with a Hugging Face template, the EOS ids plus its ``eos_token``."""
    config = config or GenerationConfig()
    hf_template = getattr(tokenizer, "chat_template", None)
    if hf_template is not None:
        eos = list(config.eos_token_id) if config.eos_token_id is not None else (
            [tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        end = tokenizer.special_tokens.get(hf_template.special_tokens.get("eos_token", ""))
        if end is not None and end not in eos:
            eos.append(end)
        return config.replace(eos_token_id=eos or None)
    end = tokenizer.special_tokens.get(END_OF_TURN)
    others = sorted(set(config.suppress_tokens) | {i for i in tokenizer.special_tokens.values() if i != end})
    eos = list(config.eos_token_id or [])
    if end is not None and end not in eos:
        eos.append(end)
    return config.replace(suppress_tokens=others, eos_token_id=eos or None)


def _is_model_folder(cand: Path) -> bool:
    """lmstack (``model_config.json``) or Hugging Face (``config.json`` with a ``model_type``)."""
    if (cand / "model_config.json").is_file():
        return True
    hf_config = cand / "config.json"
    if hf_config.is_file():
        from lmstack.tokenizer.template import read_json_config

        try:
            return "model_type" in read_json_config(hf_config)
        except LmstackError:
            # A folder whose only model file is a broken config.json is a model folder with a bad config:
            # say so (when it is the folder itself) rather than "no model found".
            return (cand / "model.safetensors").is_file()
    return False


def find_model_folder(folder: Path, prefer: Sequence[str] = ("pretrain", "chat_model")) -> Path:
    """The folder holding the model of a run: the run itself, ``model/`` or ``final/``, else (for a speedrun
    directory) the first of ``prefer`` that holds one."""
    for cand in (folder, folder / "model", folder / "final", *(folder / p for p in prefer)):
        if _is_model_folder(cand):
            return cand
    raise LmstackError(f"{folder}: no model found (expected model_config.json, a Hugging Face config.json, "
                       f"or a fine-tuning run's adapter_config.json)")


def adapter_base(run: Path, meta: Mapping[str, Any]) -> Path:
    """The base model folder an adapter run names: absolute as recorded; older runs stored it relative to the
    directory ``finetune`` ran in, so also try it relative to the run and to the current directory."""
    base = meta.get("base")
    if not isinstance(base, str) or not base:
        raise LmstackError(f"{run}/adapter_config.json: no 'base' model recorded; pass the base folder")
    p = Path(base)
    if p.is_absolute():
        cands = [p]
    else:
        cands = [run / p, Path.cwd() / p, run.parent / p]
    for c in cands:
        if c.is_dir():
            return c.resolve()
    raise LmstackError(f"{run}: the adapter's base model {base!r} does not exist (looked in "
                       f"{', '.join(str(c) for c in cands)}); move it back or re-run fine-tuning")


def load_model_folder(cand: Path, device: Any = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The model in ``cand`` (lmstack, quantized lmstack or Hugging Face format); bad files -> one-line
    LmstackError. ``dtype`` casts float models; a quantized model keeps its codes."""
    from lmstack.compress.checkpoint import is_quantized_folder, load_quantized
    from lmstack.model import hf, load

    try:
        if (cand / "model_config.json").is_file():
            if is_quantized_folder(cand):  # written by `lmstack compress quantize`: codes stay quantized
                return load_quantized(cand, device=device)
            return load(cand, device=device, dtype=dtype)
        return hf.load(cand, dtype=dtype, device=device)
    except LmstackError:
        raise
    except (UnicodeDecodeError, ValueError, OSError, RuntimeError, KeyError) as e:
        # safetensors raises SafetensorError (an Exception) or OSError/RuntimeError on truncated or random
        # files, json ValueError on a broken config: all are "this folder's files are damaged".
        raise LmstackError(f"{cand}: cannot load the model ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}); is a file truncated or not a model?") from None
    except Exception as e:  # safetensors_rust.SafetensorError derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise LmstackError(f"{cand}: model.safetensors is damaged ({' '.join(str(e).split())[:200]}); "
                           f"is the file truncated?") from None


def find_tokenizer(*folders: Path) -> Any:
    """The tokenizer in the first of ``folders`` that holds one (``load_tokenizer`` rules)."""
    from lmstack.tokenizer import has_tokenizer, load_tokenizer
    from lmstack.tokenizer.template import find_chat_template

    for tdir in folders:
        if has_tokenizer(tdir):
            tok = load_tokenizer(tdir)
            # A Hugging Face folder's chat template travels with its tokenizer (chat uses it).
            tok.chat_template = find_chat_template(tdir) if (tdir / "tokenizer_config.json").is_file() or \
                (tdir / "chat_template.jinja").is_file() else None
            return tok
    raise LmstackError(f"{folders[0]}: no tokenizer next to the model (expected tokenizer.json, vocab.json + "
                       f"merges.txt, or a .tiktoken file); copy the tokenizer the model was trained with there")


def load_run(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
             prefer: Sequence[str] = ("pretrain", "chat_model")) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from any model folder, in eval mode. ``path`` may be:

    - an lmstack model folder (``model_config.json`` + ``model.safetensors``);
    - a run directory: ``lmstack train`` (its ``model/``/``final/``), a speedrun (the first of ``prefer``
      among its stage folders: ``pretrain``, ``chat_model``; ``chat`` prefers ``chat_model``), a full
      fine-tuning run;
    - a Hugging Face folder (``config.json`` + ``model.safetensors``, tokenizer files beside it);
    - a LoRA/QLoRA, prefix-tuning or adapter fine-tuning run (``adapter_config.json``): its base is loaded
      and the adapter applied, unmerged; also a folder written by ``finetune merge`` for prefix/adapter runs.

    The tokenizer is the first found in the model folder, the run, or one folder up. Missing folders,
    damaged files and a model without a tokenizer raise a one-line :class:`LmstackError`.
    """
    from lmstack.runtime import resolve_device

    folder = Path(path)
    if not folder.exists():
        raise LmstackError(f"{folder}: no such model folder or run directory")
    if not folder.is_dir():
        raise LmstackError(f"{folder}: not a folder; pass the model folder or run directory")
    dev = resolve_device(device)
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not _is_model_folder(folder):
        from lmstack.finetune.run import load_adapter
        from lmstack.tokenizer.template import read_json_config

        base = adapter_base(folder, read_json_config(adapter))
        model = load_model_folder(find_model_folder(base, prefer), dev, dtype)
        load_adapter(model, folder)
        tok = find_tokenizer(folder, base, base.parent)
        return model.to(dev).eval(), tok
    cand = find_model_folder(folder, prefer)
    model = load_model_folder(cand, dev, dtype)
    if (cand / "adapter_config.json").is_file():  # a prefix/adapter model written by ``finetune merge``
        from lmstack.finetune.run import load_adapter

        load_adapter(model, cand)
        model.to(dev)
    return model.eval(), find_tokenizer(cand, folder, cand.parent, folder.parent)
