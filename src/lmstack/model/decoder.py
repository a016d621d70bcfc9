"""Decoder-only language model (GPT-2, Llama, Mistral, Qwen2 and our presets): embeddings -> causal blocks -> LM head.

One forward for training, evaluation and decoding::

    logits = model(input_ids)                                  # (B, T, vocab)
    logits, loss = model(input_ids, targets=targets)           # cross-entropy, ignore_index=-100 (+ MoE aux)
    logits = model(next_ids, kv_cache=cache)                   # incremental decoding (see cache.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model import layers
from lmstack.model.cache import KVCache
from lmstack.model.config import ModelConfig
from lmstack.model.layers import (AttnInputs, Block, Embeddings, SizesMixin, add_aux_losses, alibi_bias, build_mask,
                                  init_weights, make_norm, moe_aux_losses, output_logits, positions_from_mask,
                                  rope_cos_sin)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32; targets equal to -100 are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class Decoder(SizesMixin, nn.Module):
    """Causal transformer LM. ``aux_losses`` holds the MoE losses of the last forward (see :meth:`forward`)."""

    def __init__(self, config: ModelConfig, tok: nn.Embedding | None = None, cross: bool = False,
                 init: bool = True):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config, tok)            # ``tok``: an embedding shared with an encoder
        self.blocks = nn.ModuleList(Block(config, i, cross=cross) for i in range(config.n_layer))
        self.norm_f = make_norm(config) if config.final_norm else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.lm_head_bias else None
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        self.aux_losses: dict[str, torch.Tensor] = {}
        if init:  # an encoder-decoder initialises the whole model once instead
            init_weights(self)

    def attn_inputs(self, t: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                    kv_cache: KVCache | None, device: torch.device) -> tuple[AttnInputs, torch.Tensor]:
        """The mask, RoPE angles and position ids shared by all layers for T new tokens."""
        cfg = self.config
        if kv_cache is not None and kv_cache.static:
            return self._static_attn_inputs(t, position_ids, kv_cache)
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            key_mask = kv_cache.key_mask(attention_mask, t)                     # (B, S) or None
        else:
            key_mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            position_ids = positions_from_mask(key_mask, past, t, device)       # (B|1, T)
        s = past + t
        inp = AttnInputs(kv_cache=kv_cache)
        window = cfg.sliding_window
        # the window hides a key from some query only when the oldest query-visible key is farther than it
        inp.windowed = window is not None and window < s
        if not inp.windowed or cfg.max_window_layers > 0:                       # some layer attends fully
            inp.mask, inp.is_causal = self._causal_mask(key_mask, t, s, None, device)
        if inp.windowed:
            # the T queries see at most the last window + T - 1 slots: the windowed layers slice their keys
            # to those, and one mask over them serves every such layer
            n = inp.window_keys = min(s, window + t - 1)
            block = max(window, layers.WINDOW_BLOCK)
            if key_mask is None and t >= 2 * block:
                # many queries: attend in query blocks, skipping the keys outside the window; the block
                # mask is the same for every block and every windowed layer
                inp.window_block = block
                inp.window_mask, _ = self._causal_mask(None, block, block + window - 1, window, device)
            else:
                keys = key_mask[:, s - n:] if key_mask is not None else None
                inp.window_mask, _ = self._causal_mask(keys, t, n, window, device)
        if cfg.pos == "rope":
            inp.rope = rope_cos_sin(cfg, position_ids)
        return inp, position_ids

    def _causal_mask(self, key_mask: torch.Tensor | None, t: int, s: int, window: int | None,
                     device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T queries over S key slots (the queries being the last T), optionally local."""
        if self.config.pos == "alibi":
            bias = alibi_bias(self.config.n_head, t, s, True, device)           # (1, H, T, S)
            mask = build_mask(key_mask, t, s, True, device, window)
            return bias.masked_fill(~mask, float("-inf")), False
        if key_mask is None and t == s and (window is None or window >= s):
            return None, True                                                   # the fast causal kernel
        if key_mask is None and t == 1 and (window is None or window >= s):
            return None, False                                                  # one new token sees everything
        return build_mask(key_mask, t, s, True, device, window), False          # (B|1, 1, T, S)

    def _static_attn_inputs(self, t: int, position_ids: torch.Tensor | None,
                            kv_cache: KVCache) -> tuple[AttnInputs, torch.Tensor]:
        """A static-shape one-token step (see :meth:`KVCache.begin_static_step`): the query attends over
        every slot of the cache through the mask of valid ones; its position is its index among the
        row's real tokens, as on the dynamic path. Nothing here depends on a Python-side position."""
        cfg = self.config
        if t != 1 or cfg.pos == "alibi":
            raise ValueError("a static KV-cache step takes one token per row and a model without ALiBi")
        key_mask = kv_cache.static_key_mask()                                   # (B, L)
        if position_ids is None:
            position_ids = key_mask.sum(-1, keepdim=True) - 1                   # (B, 1)
        inp = AttnInputs(kv_cache=kv_cache, mask=key_mask[:, None, None, :])    # (B, 1, 1, L)
        if cfg.sliding_window is not None:                                      # tensors only: no Python position
            near = kv_cache.slot_ids > kv_cache.step_slot - cfg.sliding_window  # (L,)
            inp.windowed, inp.window_mask = True, (key_mask & near)[:, None, None, :]
        if cfg.pos == "rope":
            inp.rope = rope_cos_sin(cfg, position_ids)
        return inp, position_ids

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, vocab); with ``targets`` (B, T) -> (logits, loss).

        ``attention_mask`` (B, T), or (B, cached + T) with a cache: 1 for real tokens, 0 for padding
        (pad on the left for generation). Position ids default to each token's index among the real
        tokens of its row. The loss is the token cross-entropy plus, for MoE models,
        ``moe_aux_loss_coef * load_balance + moe_z_loss_coef * z``; those terms (means over layers) and
        the fraction of dropped assignments are in ``self.aux_losses`` after every forward.
        ``memory`` (B, S, C) and ``memory_mask`` (B, S) are the encoder output and its padding mask,
        for the cross-attention of an encoder-decoder model's decoder.
        """
        b, t = input_ids.shape
        inp, position_ids = self.attn_inputs(t, attention_mask, position_ids, kv_cache, input_ids.device)
        inp.memory = memory
        if memory_mask is not None and not bool(memory_mask.all()):
            inp.memory_mask = memory_mask.bool()[:, None, None, :]                # (B, 1, 1, S)
        x = self.embed(input_ids, position_ids)                                 # (B, T, C)
        for block in self.blocks:
            x = block(x, inp)
        if kv_cache is not None:
            kv_cache.advance(t)
        if self.norm_f is not None:
            x = self.norm_f(x)
        logits = output_logits(self.lm_head, x)                                                # (B, T, vocab)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        self.aux_losses = moe_aux_losses(self) if self.config.n_experts else {}
        if targets is None:
            return logits
        return logits, add_aux_losses(lm_loss(logits, targets), self.aux_losses, self.config)
