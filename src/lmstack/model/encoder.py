"""Encoder-only model (BERT, sentence-transformers): bidirectional blocks, MLM head, pooling, classification.

    hidden = model.encode(ids, attention_mask=mask)                  # (B, T, C)
    logits, loss = model(ids, attention_mask=mask, targets=labels)   # masked LM (needs ``mlm_head``)
    scores = model.classify(ids, attention_mask=mask)                 # (B, n_labels); 1 label = cross-encoder
    emb = sentence_embeddings(model, tokenizer, texts)                # (N, C), mean-pooled, L2-normalised
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.decoder import lm_loss
from lmstack.model.layers import (ACT, AttnInputs, Block, Embeddings, SizesMixin, alibi_bias, build_mask,
                                  add_aux_losses, init_weights, make_norm, moe_aux_losses, output_logits, positions_from_mask,
                                  rope_cos_sin)


def encoder_inputs(cfg: ModelConfig, key_mask: torch.Tensor | None, t: int,
                   position_ids: torch.Tensor, device: torch.device) -> AttnInputs:
    """Bidirectional attention inputs: padding mask (and ALiBi / RoPE) for a (B, T) batch.

    With ``cfg.sliding_window`` = w the windowed layers see the band |q - k| <= w (one mask, built here
    only when the band is narrower than the sequence, shared by those layers)."""
    inp = AttnInputs(mask=build_mask(key_mask, t, t, False, device))
    w = cfg.sliding_window
    inp.windowed = w is not None and w < t - 1
    if inp.windowed:
        inp.window_mask = build_mask(key_mask, t, t, False, device, w)          # (B|1, 1, T, T)
    if cfg.pos == "alibi":
        bias = alibi_bias(cfg.n_head, t, t, False, device)                     # (1, H, T, T)
        inp.mask = bias if inp.mask is None else bias.masked_fill(~inp.mask, float("-inf"))
        if inp.windowed:
            inp.window_mask = bias.masked_fill(~inp.window_mask, float("-inf"))
    if cfg.pos == "rope":
        inp.rope = rope_cos_sin(cfg, position_ids)
    return inp


class MLMHead(nn.Module):
    """dense -> activation -> norm -> vocabulary projection (BERT's ``cls.predictions``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACT[cfg.activation]
        self.norm = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class Encoder(SizesMixin, nn.Module):
    """Bidirectional transformer. Heads exist as configured: ``mlm_head``, ``pooler``, ``n_labels``.
    ``aux_losses`` holds the MoE losses of the last forward, as in the decoder."""

    def __init__(self, config: ModelConfig, tok: nn.Embedding | None = None, init: bool = True):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config, tok)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config) if config.final_norm else None
        self.mlm = MLMHead(config) if config.mlm_head else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False) if config.mlm_head else None
        self.lm_head_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.mlm_head and config.lm_head_bias \
            else None
        if self.lm_head is not None and config.tie_embeddings:
            self.lm_head.weight = self.embed.tok.weight
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None
        self.classifier = nn.Linear(config.d_model, config.n_labels) if config.n_labels else None
        self.drop = nn.Dropout(config.dropout)
        self.aux_losses: dict[str, torch.Tensor] = {}
        if init:  # an encoder-decoder initialises the whole model once instead
            init_weights(self)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) of the last block (after the final norm, if any)."""
        b, t = input_ids.shape
        key_mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            position_ids = positions_from_mask(key_mask, 0, t, input_ids.device)
        inp = encoder_inputs(self.config, key_mask, t, position_ids, input_ids.device)
        x = self.embed(input_ids, position_ids, token_type_ids)                 # (B, T, C)
        for block in self.blocks:
            x = block(x, inp)
        self.aux_losses = moe_aux_losses(self) if self.config.n_experts else {}
        return self.norm_f(x) if self.norm_f is not None else x

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """Masked-LM logits (B, T, vocab) (``(logits, loss)`` with ``targets``, -100 = not masked).

        A model without an MLM head (a sentence encoder) returns the hidden states (B, T, C) instead.
        """
        x = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        if self.lm_head is None:
            if targets is not None:
                raise ConfigError("this encoder has no MLM head (model config field 'mlm_head' is false)")
            return x
        logits = output_logits(self.lm_head, self.mlm(x))                                      # (B, T, vocab)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        if targets is None:
            return logits
        return logits, add_aux_losses(lm_loss(logits, targets), self.aux_losses, self.config)

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-classification logits (B, n_labels) from the first token (through the pooler if any).

        With ``n_labels=1`` and a text pair encoded with token types 0/1 this is a cross-encoder score.
        """
        if self.classifier is None:
            raise ConfigError("this encoder has no classification head (model config field 'n_labels' is 0)")
        x = self.encode(input_ids, attention_mask, token_type_ids)[:, 0]        # (B, C)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.drop(x))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, T, C) -> (B, C): ``mean`` over real tokens, ``cls`` (first token) or ``max`` over real tokens."""
    mask = attention_mask.to(hidden.dtype)[..., None]                           # (B, T, 1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    raise ConfigError(f"pooling: unknown pooling {pooling!r}; use mean, cls or max")


def truncate_ids(ids: list[int], max_length: int) -> list[int]:
    """The first ``max_length - 1`` ids and the closing special token (``[SEP]``), as sentence-transformers
    truncates an input to its window; ``ids`` unchanged when they fit."""
    return ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:]


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Whole ids with the model's special tokens, from a HF ``tokenizers.Tokenizer`` or an lmstack tokenizer.

    A HF ``Tokenizer`` applies its own template ([CLS] .. [SEP]) and padding, which is stripped here via
    its attention mask. A truncation setting saved in its ``tokenizer.json`` (MiniLM's says 128) is lifted for
    the call and put back, so the window is the caller's (:func:`truncate_ids`), not the file's. An lmstack
    tokenizer returns bare ids; they are wrapped in ``[CLS]`` .. ``[SEP]`` (or ``<s>`` .. ``</s>``) when its
    ``special_tokens`` has them, as BERT-family encoders expect.
    """
    if not hasattr(tokenizer, "encode_batch"):
        raise ConfigError("tokenizer: expected an object with encode_batch (lmstack or HF tokenizers)")
    saved = getattr(tokenizer, "truncation", None) if hasattr(tokenizer, "no_truncation") else None
    if saved:
        tokenizer.no_truncation()
    try:
        out = tokenizer.encode_batch(list(texts))
    finally:
        if saved:
            tokenizer.enable_truncation(**saved)
    if out and hasattr(out[0], "ids"):
        return [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in out]
    special = getattr(tokenizer, "special_tokens", None) or {}
    for first, last in (("[CLS]", "[SEP]"), ("<s>", "</s>")):
        if first in special and last in special:
            return [[special[first], *seq, special[last]] for seq in out]
    return [list(seq) for seq in out]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str = "mean",
                        normalize: bool = True, batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
    """Embed ``texts`` with an encoder: tokenize, right-pad, encode, pool, L2-normalise -> (N, C) fp32.

    The tokenizer must add the model's special tokens itself (HF tokenizer.json files do, e.g. [CLS] .. [SEP]).
    Sequences longer than ``max_length`` are cut as sentence-transformers cuts them (:func:`truncate_ids`).
    The default is the window of a sentence-transformers folder (``model.sentence_max_length``, from its
    ``sentence_bert_config.json``), else the model's ``max_seq_len``.
    """
    encode = getattr(model, "encode", None)
    if encode is None:
        raise ConfigError("sentence_embeddings needs an encoder model (config arch 'encoder')")
    cfg = model.config
    max_length = max_length or getattr(model, "sentence_max_length", None) or cfg.max_seq_len
    pad_id = cfg.pad_token_id or 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids = [truncate_ids(seq, max_length) for seq in _token_ids(tokenizer, texts[start:start + batch_size])]
        width = max(len(s) for s in ids)
        batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, seq in enumerate(ids):
            batch[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        batch, mask = batch.to(device), mask.to(device)
        emb = pool(encode(batch, attention_mask=mask).float(), mask, pooling)
        chunks.append(F.normalize(emb, dim=-1) if normalize else emb)
    model.train(was_training)
    return torch.cat(chunks).cpu() if chunks else torch.empty(0, cfg.d_model)
