"""One interface over decoder-only and encoder-decoder models for the decoding loops: prefill, then new tokens.

The loops keep every row's tokens in one buffer ``seq`` (B, L): left-padded prompt, then generated
tokens. Column j of ``seq`` is slot j of the KV cache, so rewinding (speculative decoding) and
reordering (beam search) act on both alike. For an encoder-decoder model ``seq`` holds the decoder
tokens (start token first) and the source is encoded once at prefill.

Without a cache (``use_cache=False``) every step recomputes the whole sequence: the reference the
cached path is tested against, and the "no KV cache" row of the benchmark.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.model.cache import make_kv_cache


class Runner:
    """Holds the model, its KV cache (or the mask for full recomputation) and the encoder memory."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, use_cache: bool = True,
                 window: int | None = None, kv_cache_dtype: str = "auto"):
        self.model = model
        self.seq2seq = model.config.arch == "encoder-decoder"
        self.use_cache = use_cache
        self.window = window
        length = min(max_len, window) if window else max_len
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
                self.cache.shift(overflow)
            pos = self.next_pos[:, None] + torch.arange(t, device=seq.device)    # (B, t)
            self.next_pos = self.next_pos + t
        return self._model(seq[:, cur - t:cur], None, pos)

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
