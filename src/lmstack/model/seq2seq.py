"""Encoder-decoder model (BART): a bidirectional encoder, a causal decoder with cross-attention, a seq2seq LM head.

    logits, loss = model(src_ids, dec_ids, attention_mask=src_mask, targets=labels)
    memory = model.encode(src_ids, attention_mask=src_mask)                       # (B, S, C), once
    cache = KVCache.for_model(model, batch_size=B, max_len=64)
    logits = model.decode(dec_ids, memory, memory_mask=src_mask, kv_cache=cache)  # then one token per step

The token embedding is shared by the encoder, the decoder and (when ``tie_embeddings``) the LM head.
``n_encoder_layer`` sets the encoder depth, ``n_layer`` the decoder's; the KV cache covers the decoder
(its cross-attention K/V are computed from the encoder output at the first step and kept in ``cache.cross``).
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.model.cache import KVCache
from lmstack.model.config import ModelConfig
from lmstack.model.decoder import Decoder, lm_loss
from lmstack.model.encoder import Encoder
from lmstack.model.layers import SizesMixin, add_aux_losses, init_weights, moe_aux_losses


class Seq2Seq(SizesMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        enc_cfg = config.replace(arch="encoder", n_layer=config.n_encoder_layer or config.n_layer, mlm_head=False,
                                 pooler=False, n_labels=0, lm_head_bias=False)
        self.encoder = Encoder(enc_cfg, tok=self.shared, init=False)
        self.decoder = Decoder(config.replace(arch="decoder"), tok=self.shared, cross=True, init=False)
        init_weights(self)  # once, with the residual scaling of the whole depth (encoder + decoder blocks)

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """MoE losses of the last forward, averaged over the encoder's and the decoder's MoE layers."""
        return moe_aux_losses(self) if self.config.n_experts else {}

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder.encode(input_ids, attention_mask)                 # (B, S, C)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Decoder logits (B, T, vocab) given the encoder output ``memory`` (B, S, C)."""
        return self.decoder(decoder_input_ids, attention_mask=decoder_attention_mask, kv_cache=kv_cache,
                            memory=memory, memory_mask=memory_mask)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                *, attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, memory: torch.Tensor | None = None):
        """Source ids (B, S) and decoder ids (B, T) -> logits (B, T, vocab); ``(logits, loss)`` with targets.

        Pass ``memory`` (the result of :meth:`encode`) to skip re-encoding the source when decoding step by step.
        """
        if memory is None:
            memory = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask, kv_cache)
        if targets is None:
            return logits
        return logits, add_aux_losses(lm_loss(logits, targets), self.aux_losses, self.config)
