"""One interface over decoder-only and encoder-decoder models for the decoding loops: prefill, then new tokens.

The loops keep every row's tokens in one buffer ``seq`` (B, L): left-padded prompt, then generated
tokens. Column j of ``seq`` is slot j of the KV cache, so rewinding (speculative decoding) and
reordering (beam search) act on both alike. For an encoder-decoder model ``seq`` holds the decoder
tokens (start token first) and the source is encoded once at prefill.

Without a cache (``use_cache=False``) every step recomputes the whole sequence: the reference the
cached path is tested against, and the "no KV cache" row of the benchmark.

``compile=True`` (decoder-only, KV cache, no sliding window, no ALiBi) makes every one-token step a
static-shape step (:meth:`lmstack.model.cache.KVCache.begin_static_step`) run through
``torch.compile``: a fixed-size cache (its length rounded up to a multiple of 256, and kept per model
and shape between calls so the compiled graph is reused), the slot to write as a tensor, attention
over all slots under the mask of valid ones. Where compiling fails (no C++ compiler, an op the
backend lacks, a graph break) that model's static step runs eagerly, with one warning per reason.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from lmstack.model.cache import KVCache, make_kv_cache

STATIC_BUCKET = 256          # compiled steps: cache lengths are rounded up to this, so few shapes exist

_STATIC_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, KVCache]]" = weakref.WeakKeyDictionary()
_compiled: dict[str, Any] = {}   # device type -> the compiled static step, made on first use
_failed: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()   # models that did not compile
_said: set[str] = set()
_prepared: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # models whose kernel state is built for compiling
EAGER_ONLY = False           # run the static step eagerly, never compiling (tests of the static path)


def static_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) fp32 of one static-shape step: ``tokens`` (B, 1) at the cache's ``step_slot``."""
    return model(tokens, kv_cache=cache)[:, -1].float()


def compile_unsupported(model: nn.Module, use_cache: bool, window: int | None) -> str | None:
    """Why the compiled static step cannot serve this model/config, or None when it can."""
    cfg = model.config
    if cfg.arch != "decoder":
        return "an encoder-decoder model"
    if not use_cache:
        return "use_cache=false"
    if window:
        return "a sliding window"
    if cfg.pos == "alibi":
        return "ALiBi positions"
    return None


def _warn_once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        warnings.warn(f"torch.compile is unavailable for the decode step ({why}); decoding eagerly",
                      RuntimeWarning, stacklevel=3)


def prepare_kernels(model: nn.Module) -> None:
    """Let modules build kernel state outside the graph before compiling: any module with a
    ``prepare_kernels(dtype)`` method (a quantized linear packs its weight for the fused int4 kernel)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for mod in model.modules():
        hook = getattr(mod, "prepare_kernels", None)
        if callable(hook) and mod is not model:
            hook(dtype)


def run_compiled_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`static_step` through ``torch.compile`` (compiled once, reused for every position and call);
    the eager static step where compiling is not possible."""
    if not EAGER_ONLY and model not in _failed:
        try:
            kind = tokens.device.type
            fn = _compiled.get(kind)
            if fn is None:
                # on CPU the C++ wrapper calls the kernels without a Python frame each: ~1.2x faster
                # steps on a tiny model, and it compiles no slower (measured, stories260K)
                options = {"cpp_wrapper": True} if kind == "cpu" else None
                # fullgraph: a graph break (e.g. a layer with Python-side caches) fails here and falls
                # back, instead of compiling a patchwork that recompiles per layer
                fn = _compiled[kind] = torch.compile(static_step, dynamic=False, fullgraph=True, options=options)
            if model not in _prepared:
                prepare_kernels(model)
                _prepared.add(model)
            return fn(model, cache, tokens)
        except Exception as e:   # a missing compiler, a backend gap, a graph break: fall back (retrying is safe)
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            _failed[model] = why
            _warn_once(why)
    return static_step(model, cache, tokens)


def static_cache(model: nn.Module, batch: int, length: int, kind: str) -> KVCache:
    """A fixed-size cache for compiled steps, reused between calls with the same shape (then reset)."""
    ctx = model.config.max_seq_len
    size = max(length, min(-(-length // STATIC_BUCKET) * STATIC_BUCKET, ctx))
    param = next(model.parameters())
    key = (batch, size, kind, param.dtype, str(param.device))
    per_model = _STATIC_CACHES.setdefault(model, {})
    cache = per_model.get(key)
    if cache is None:
        cache = per_model[key] = make_kv_cache(model, batch, size, kind)
    cache.reset()
    return cache


class Runner:
    """Holds the model, its KV cache (or the mask for full recomputation) and the encoder memory."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, use_cache: bool = True,
                 window: int | None = None, kv_cache_dtype: str = "auto", compile: bool = False,
                 sinks: int = 0):
        self.model = model
        self.seq2seq = model.config.arch == "encoder-decoder"
        self.use_cache = use_cache
        self.window = window
        self.sinks = sinks                           # attention sinks the full window cache keeps (StreamingLLM)
        length = min(max_len, window) if window else max_len
        self.compiled = False          # one-token steps go through the compiled static step
        if compile:
            why = compile_unsupported(model, use_cache, window)
            if why:
                _warn_once(f"not for {why}")
            self.compiled = why is None
        if self.compiled:
            self.cache = static_cache(model, batch, length, kv_cache_dtype)
        else:
            self.cache = make_kv_cache(model, batch, length, kv_cache_dtype) if use_cache else None
        self.mask: torch.Tensor | None = None        # (B, L) padding mask, for recomputation
        self.memory: torch.Tensor | None = None      # encoder output (B, S, C)
        self.memory_mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None    # (B,) position id of the next token (sliding window)

    def _model(self, tokens: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor:
        if self.seq2seq:
            return self.model.decode(tokens, self.memory, memory_mask=self.memory_mask,
                                     decoder_attention_mask=mask, kv_cache=self.cache)
        return self.model(tokens, attention_mask=mask, position_ids=pos, kv_cache=self.cache)

    def prefill(self, seq: torch.Tensor, cur: int, mask: torch.Tensor | None,
                src: torch.Tensor | None = None, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, cur, V) of the first ``cur`` tokens of ``seq``; ``mask`` (B, cur) marks left padding."""
        if self.seq2seq:
            self.memory_mask = src_mask
            self.memory = self.model.encode(src, attention_mask=src_mask)      # (B, S, C)
            mask = None                                                        # decoder tokens are never padded
        if mask is not None and bool(mask.all()):
            mask = None
        if not self.use_cache:
            self.mask = torch.ones(seq.shape, dtype=torch.bool, device=seq.device)
            if mask is not None:
                self.mask[:, :cur] = mask.bool()
        pos = None
        if self.window:
            real = mask.long() if mask is not None else torch.ones_like(seq[:, :cur])
            pos = (real.cumsum(-1) - 1).clamp(min=0)                            # (B, cur)
            self.next_pos = real.sum(-1)                                         # (B,)
        return self._model(seq[:, :cur], mask, pos)

    def forward(self, seq: torch.Tensor, cur: int, t: int) -> torch.Tensor:
        """Logits (B, t, V) for the tokens seq[:, cur - t:cur], all earlier ones being known."""
        if not self.use_cache:
            mask = self.mask[:, :cur] if not bool(self.mask[:, :cur].all()) else None
            return self._model(seq[:, :cur], mask, None)[:, -t:]
        pos = None
        if self.window:
            overflow = self.cache.pos + t - self.cache.max_len
            if overflow > 0:
                self.cache.shift(overflow, self.sinks)
            pos = self.next_pos[:, None] + torch.arange(t, device=seq.device)    # (B, t)
            self.next_pos = self.next_pos + t
        return self._model(seq[:, cur - t:cur], None, pos)

    def step(self, seq: torch.Tensor, cur: int) -> torch.Tensor:
        """Logits (B, V) fp32 of the token after ``seq[:, :cur]``, the last of which is new: the decode step."""
        if not self.compiled:
            return self.forward(seq, cur, 1)[:, -1].float()
        self.cache.begin_static_step()
        try:
            return run_compiled_step(self.model, self.cache, seq[:, cur - 1:cur])
        finally:
            self.cache.end_static_step()

    def rewind(self, cur: int) -> None:
        """Keep the first ``cur`` tokens (columns of ``seq``) in the cache, drop the rest."""
        if self.cache is not None:
            self.cache.rewind(cur)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i continues from row ``index[i]`` (B,)."""
        if self.cache is not None:
            self.cache.reorder(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, index)
            if self.memory_mask is not None:
                self.memory_mask = self.memory_mask.index_select(0, index)
