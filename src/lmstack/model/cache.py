"""The KV cache: preallocated keys and values per layer, and the padding mask of the positions so far.

A small plain object. The model writes into it and advances it; the caller only creates, resets and
(optionally) reads it::

    cache = KVCache.for_model(model, batch_size=2, max_len=128)
    logits = model(prompt_ids, attention_mask=prompt_mask, kv_cache=cache)   # prefill: writes T slots
    for _ in range(n):
        logits = model(next_ids, kv_cache=cache)                            # decode: one slot per step
    cache.reset()                                                            # reuse for the next batch

Layout: ``k[layer]`` and ``v[layer]`` are (B, n_kv_head, max_len, head_dim) — KV heads, not query
heads, so GQA/MQA models cache ``n_head / n_kv_head`` times less. ``pos`` is the number of slots filled
(the same for every row: ragged prompts are left-padded). ``mask`` (B, max_len) marks real tokens;
the model derives the attention mask and the position ids (index among the real tokens) from it.

Attention masks passed with a cache may cover all slots so far plus the new ones, (B, pos + T), as
in Hugging Face, or only the new tokens, (B, T); without one the new tokens count as real.

Static-shape steps (what ``torch.compile`` needs, see :meth:`KVCache.begin_static_step`): between
``begin_static_step()`` and ``end_static_step()`` a one-token forward writes its key/value at the slot
held in the tensor ``step_slot`` (not a Python int, so one compiled graph serves every position) and
attends over all ``max_len`` slots, with the padding mask cut at that slot as the attention mask; the
model reads no Python-side position, and ``advance`` is left to ``end_static_step``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmstack.errors import ConfigError


class KVCache:
    """Static-shape K/V buffers for ``n_layer`` layers, plus cross-attention K/V for encoder-decoder models."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = 0                 # slots filled so far
        self.padded = False          # some real row has padding: the model must build explicit masks
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # layer -> encoder K, V (B, G, S, D)
        self.static = False          # inside a static-shape step (begin_static_step .. end_static_step)
        self.step_slot = torch.zeros(1, dtype=torch.long, device=device)       # the slot that step writes
        self.slot_ids = torch.arange(max_len, device=device)                   # (max_len,) for its mask

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "KVCache":
        """A cache sized for ``model`` (its config; its parameters' dtype and device unless given)."""
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.max_seq_len, cfg.head_dim,
                   dtype or param.dtype, device or param.device)

    ROW_BUFFERS = ("k", "v")     # the per-layer lists of (B, G, max_len, ...) buffers

    def tensors(self) -> list[torch.Tensor]:
        """Every per-slot buffer (B, G, max_len, ...): what reorder, shift and row copies move together."""
        return [t for name in self.ROW_BUFFERS for t in getattr(self, name)]

    def rows_view(self, n: int) -> KVCache:
        """A cache over the first ``n`` rows that shares this one's buffers (writes land here).

        A running batch keeps its occupied rows at the front and forwards only them; after the forward,
        :meth:`sync_from` takes the view's cursor back."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"cannot view {n} rows of a {self.batch_size}-row cache")
        view = copy.copy(self)
        for name in self.ROW_BUFFERS:
            setattr(view, name, [t[:n] for t in getattr(self, name)])
        view.mask, view.batch_size = self.mask[:n], n
        view.cross = {i: (k[:n], v[:n]) for i, (k, v) in self.cross.items()}
        return view

    def sync_from(self, view: KVCache) -> None:
        """Take the cursor and padding flag of a :meth:`rows_view` after a forward through it."""
        self.pos, self.padded = view.pos, self.padded or view.padded

    def move_row(self, src: int, dst: int) -> None:
        """Row ``dst`` takes row ``src``'s filled slots and mask; ``src`` becomes padding (free)."""
        for buf in self.tensors():
            buf[dst, :, :self.pos] = buf[src, :, :self.pos]
        self.mask[dst] = self.mask[src]
        self.clear_row(src)

    @property
    def bytes(self) -> int:
        """Memory held by the K and V buffers (and their scales, when quantized)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every position (buffers are kept and overwritten)."""
        self.pos = 0
        self.padded = False
        self.static = False
        self.mask.fill_(True)
        self.cross.clear()

    def begin_static_step(self) -> None:
        """Make the next forward a static-shape step of one token per row, written at slot ``pos``.

        The step's shapes do not depend on ``pos``: keys and values go to ``step_slot`` (a (1,) tensor set
        here, in place) and attention spans all ``max_len`` slots under :meth:`static_key_mask`, so the
        same compiled graph runs at every position. Call :meth:`end_static_step` after the forward."""
        if self.pos >= self.max_len:
            raise ConfigError(f"KV cache is full: {self.pos} + 1 positions > max_len={self.max_len}")
        self.step_slot.fill_(self.pos)
        self.static = True

    def end_static_step(self) -> None:
        """The static step's token now occupies slot ``pos``: advance."""
        self.static = False
        self.pos += 1

    def static_key_mask(self) -> torch.Tensor:
        """(B, max_len) slots a static step attends to: the real ones before ``step_slot``, and itself."""
        self.mask.index_fill_(1, self.step_slot, True)
        return self.mask & (self.slot_ids <= self.step_slot)

    def key_mask(self, attention_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
        """Record the padding of ``t`` new tokens; return the mask of all slots (B, pos + t), or None if unpadded."""
        end = self.pos + t
        if end > self.max_len:
            raise ConfigError(f"KV cache is full: {self.pos} + {t} positions > max_len={self.max_len}")
        if attention_mask is not None:
            if attention_mask.shape[1] == end:
                new = attention_mask[:, self.pos:]
            elif attention_mask.shape[1] == t:
                new = attention_mask
            else:
                raise ConfigError(f"attention_mask has {attention_mask.shape[1]} positions; with a KV cache "
                                  f"holding {self.pos} it must have {end} (all) or {t} (the new tokens)")
            self.mask[:, self.pos:end] = new.bool()
            if not bool(new.bool().all()):
                self.padded = True
        else:
            self.mask[:, self.pos:end] = True
        return self.mask[:, :end] if self.padded else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v (B, G, T, D) of ``layer`` at slots [pos, pos + T); return all filled slots (B, G, S, D)."""
        if self.static:                                   # all slots; the mask hides the unwritten ones
            self.k[layer].index_copy_(2, self.step_slot, k)
            self.v[layer].index_copy_(2, self.step_slot, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        """Called by the model once all layers have written ``t`` new slots (a static step advances in
        :meth:`end_static_step` instead, outside any compiled code)."""
        if not self.static:
            self.pos += t

    # ----- used by the inference engine (lmstack.infer): speculative rollback, beam reordering, sliding window,
    # ----- and rows that join and leave a running batch (lmstack.infer.batch)

    def rewind(self, pos: int) -> None:
        """Forget every slot from ``pos`` on (speculative decoding drops rejected draft tokens this way)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind a KV cache holding {self.pos} positions to {pos}")
        self.pos = pos

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes the cache of row ``index[i]`` (B,) (beam search: each beam continues its parent)."""
        end = self.pos
        for buf in self.tensors():
            buf[:, :, :end] = buf[:, :, :end].index_select(0, index)
        self.mask[:, :end] = self.mask[:, :end].index_select(0, index)
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}

    def shift(self, n: int, sinks: int = 0) -> None:
        """Drop the ``n`` oldest slots, moving the rest to the front (a sliding window over the sequence).

        Keys keep the positions they were computed at (RoPE is applied before caching), so the caller
        must pass explicit ``position_ids`` from then on.

        ``sinks`` > 0 (attention sinks, StreamingLLM): the first ``sinks`` real tokens of every row stay;
        each row drops its padding slots first, then its oldest real tokens after the sinks, so rows
        keep their order: padding, sinks, the most recent tokens.
        """
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot drop {n} of {self.pos} cached positions")
        if sinks > 0:
            return self._evict_after_sinks(n, sinks)
        keep = self.pos - n
        for buf in self.tensors():
            buf[:, :, :keep] = buf[:, :, n:self.pos].clone()
        self.mask[:, :keep] = self.mask[:, n:self.pos].clone()
        self.pos = keep

    def _evict_after_sinks(self, n: int, sinks: int) -> None:
        """:meth:`shift` keeping each row's first ``sinks`` real tokens: one gather per buffer, per row."""
        p = self.pos
        real = self.mask[:, :p]                                                  # (B, P)
        slot = self.slot_ids[:p]
        is_sink = real & (real.long().cumsum(-1) <= sinks)
        if n > p - int(is_sink.sum(-1).max()):
            raise ValueError(f"cannot drop {n} of {self.pos} cached positions keeping {sinks} sink tokens")
        # drop order: padding, then real tokens oldest first; sinks last (never reached, checked above)
        order = torch.where(is_sink, 2 * p + slot, torch.where(real, p + slot, slot))
        kept = order.argsort(dim=-1)[:, n:].sort(dim=-1).values                 # (B, P - n) slots, in order
        for buf in self.tensors():
            idx = kept[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            buf[:, :, :p - n] = buf[:, :, :p].gather(2, idx)
        self.mask[:, :p - n] = real.gather(1, kept)
        self.pos = p - n

    def pad_left(self, n: int) -> None:
        """Move every filled slot ``n`` to the right and mark the ``n`` freed front slots as padding.

        Positions come from the mask (index among a row's real slots) and RoPE keys keep their rotation,
        so every row attends exactly as before; this makes room at the front for a longer prompt.
        """
        if not 0 <= n <= self.max_len - self.pos:
            raise ValueError(f"cannot pad {n} slots in front of {self.pos} in a cache of {self.max_len}")
        if n == 0:
            return
        end = self.pos
        for buf in self.tensors():
            buf[:, :, n:end + n] = buf[:, :, :end].clone()
        self.mask[:, n:end + n] = self.mask[:, :end].clone()
        self.mask[:, :n] = False
        self.pos = end + n
        self.padded = True

    def write_row(self, row: int, src: KVCache, start: int) -> None:
        """Copy the filled slots of ``src`` (a one-row cache, e.g. a prompt's prefill) into row ``row`` at
        slots ``[start, start + src.pos)``; the row's earlier slots become padding.

        The copied slots must end at or before this cache's ``pos`` (the batch's shared cursor)."""
        end = start + src.pos
        if start < 0 or end > self.pos:
            raise ValueError(f"slots [{start}, {end}) are outside the {self.pos} filled slots")
        for dst, s in zip(self.tensors(), src.tensors()):
            dst[row, :, start:end] = s[0, :, :src.pos]
        self.mask[row, :start] = False
        self.mask[row, start:end] = src.mask[0, :src.pos]
        self.padded = True

    def clear_row(self, row: int) -> None:
        """Mark every slot of ``row`` as padding (the row is free: nothing in it is attended to)."""
        self.mask[row] = False
        self.padded = True


class Int8KVCache(KVCache):
    """A KV cache stored in int8 with one fp32 scale per (row, KV head, position): ``k ~ q * s`` with
    ``s = max|k[..., :]| / 127`` over the head dimension, so each cached vector keeps its own range.

    It holds about a quarter of an fp32 cache (half of bf16) plus 4 bytes per head and position; the
    attention reads the dequantized keys and values, so logits move by the rounding of each vector
    (tested against the float cache). Moving slots (beam reordering, speculative rewind, sliding window,
    left padding) moves codes and scales together.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(n_layer, batch_size, n_kv_head, max_len, head_dim, torch.int8, device)  # the codes
        scale_shape = (batch_size, n_kv_head, max_len, 1)
        self.k_scale = [torch.zeros(scale_shape, device=device) for _ in range(n_layer)]
        self.v_scale = [torch.zeros(scale_shape, device=device) for _ in range(n_layer)]

    ROW_BUFFERS = ("k", "v", "k_scale", "v_scale")

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127     # (B, G, T, 1)
        return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qk, sk = self._quantize(k)
        qv, sv = self._quantize(v)
        if self.static:
            end = self.max_len
            for buf, x in ((self.k[layer], qk), (self.k_scale[layer], sk), (self.v[layer], qv),
                           (self.v_scale[layer], sv)):
                buf.index_copy_(2, self.step_slot, x)
        else:
            end = self.pos + k.shape[2]
            self.k[layer][:, :, self.pos:end], self.k_scale[layer][:, :, self.pos:end] = qk, sk
            self.v[layer][:, :, self.pos:end], self.v_scale[layer][:, :, self.pos:end] = qv, sv
        keys = (self.k[layer][:, :, :end].float() * self.k_scale[layer][:, :, :end]).to(k.dtype)
        values = (self.v[layer][:, :, :end].float() * self.v_scale[layer][:, :, :end]).to(v.dtype)
        return keys, values


def make_kv_cache(model: nn.Module, batch_size: int, max_len: int | None = None, kind: str = "auto") -> KVCache:
    """The cache a generation config asks for: ``auto`` (the model's dtype) or ``int8``."""
    if kind == "int8":
        return Int8KVCache.for_model(model, batch_size, max_len)
    return KVCache.for_model(model, batch_size, max_len)
