"""Prefix tuning (Li & Liang 2021): trainable virtual keys and values prepended in every attention layer.

Each layer's self-attention sees ``n_prefix`` extra key/value slots before the real tokens; every query
may attend to them; the model's weights stay frozen. The prefix is either free parameters per layer,
``(n_kv_head, P, head_dim)`` for K and for V, or (``reparam=True``, the paper's stabiliser) produced by a
small MLP from a ``(P, d_model)`` embedding: ``MLP: d_model -> hidden -> n_layer * 2 * kv_dim``. After
training the MLP can be dropped by :func:`bake_prefix`, which stores its output as plain tensors.

Implementation: module swap of each ``Attention`` by :class:`PrefixAttention`, which reuses the wrapped
layer's projections and repeats its forward with the prefix concatenated to K and V (keys are stored
already rotated, so RoPE models give the prefix no position; real tokens keep positions 0, 1, ...).
Works with the KV cache: the prefix is not cached, it is prepended at every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.layers import Attention, AttnInputs, apply_rope, attention, build_mask


@dataclass
class PrefixConfig:
    n_prefix: int = 16           # virtual tokens per layer
    reparam: bool = True         # produce the prefix with an MLP (more stable training)
    hidden: int = 256            # the MLP's hidden width
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_prefix < 1:
            raise ConfigError(f"prefix.n_prefix: must be >= 1, got {self.n_prefix}")
        if self.hidden < 1:
            raise ConfigError(f"prefix.hidden: must be >= 1, got {self.hidden}")


class PrefixEncoder(nn.Module):
    """All layers' prefix K/V: ``kv(layer) -> (k, v)`` each (G, P, D)."""

    def __init__(self, cfg: PrefixConfig, n_layer: int, n_kv_head: int, head_dim: int, d_model: int):
        super().__init__()
        self.cfg, self.n_layer, self.g, self.d = cfg, n_layer, n_kv_head, head_dim
        width = n_layer * 2 * n_kv_head * head_dim
        if cfg.reparam:
            self.embedding = nn.Parameter(torch.randn(cfg.n_prefix, d_model) * cfg.init_std)
            self.mlp = nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, width))
            for lin in (self.mlp[0], self.mlp[2]):
                nn.init.normal_(lin.weight, 0.0, cfg.init_std)
                nn.init.zeros_(lin.bias)
            self.table = None
        else:
            self.table = nn.Parameter(torch.randn(cfg.n_prefix, width) * cfg.init_std)

    def forward(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.table if self.table is not None else self.mlp(self.embedding)     # (P, L*2*G*D)
        p = flat.shape[0]
        kv = flat.view(p, self.n_layer, 2, self.g, self.d)[:, layer]                 # (P, 2, G, D)
        kv = kv.permute(1, 2, 0, 3)                                                  # (2, G, P, D)
        return kv[0], kv[1]


class PrefixAttention(nn.Module):
    """``Attention`` with prefix keys/values from a shared :class:`PrefixEncoder`."""

    def __init__(self, attn: Attention, encoder_ref: list[PrefixEncoder]):
        super().__init__()
        self.attn = attn
        self._encoder = encoder_ref          # a list, so the shared encoder is not registered once per layer

    def forward(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        a = self.attn
        b, t, _ = x.shape                                                   # x (B, T, C)
        q, k, v = a.qkv(x).split([a.cfg.q_dim, a.cfg.kv_dim, a.cfg.kv_dim], dim=-1)
        q = a._heads(q, a.n_head)                                           # (B, H, T, D)
        k, v = a._heads(k, a.n_kv_head), a._heads(v, a.n_kv_head)           # (B, G, T, D)
        if inp.rope is not None:
            q, k = apply_rope(q, *inp.rope), apply_rope(k, *inp.rope)
        if inp.kv_cache is not None:
            k, v = inp.kv_cache.update(a.layer_idx, k, v)                   # (B, G, S, D)
        pk, pv = self._encoder[0](a.layer_idx)                              # (G, P, D)
        n_p = pk.shape[1]
        k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)     # (B, G, P + S, D)
        v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
        s = k.shape[2]
        mask = inp.mask
        if mask is None:
            # causal over the real slots (queries are the last T), every query sees the prefix
            mask = build_mask(None, t, s - n_p, True, x.device) if (inp.is_causal or t > 1) else None
        if mask is not None:
            if mask.dtype == torch.bool:
                pad = torch.ones(*mask.shape[:-1], n_p, dtype=torch.bool, device=mask.device)
            else:                                                           # ALiBi: the prefix gets no bias
                pad = torch.zeros(*mask.shape[:-1], n_p, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([pad, mask], dim=-1)                           # (B|1, 1|H, T, P + S)
        dropout_p = a.cfg.dropout if self.training else 0.0
        y = attention(q, k, v, mask, False, dropout_p, a.impl)              # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, a.cfg.q_dim)
        return a.o(y)


def add_prefix(model: nn.Module, cfg: PrefixConfig, freeze: bool = True) -> PrefixEncoder:
    """Swap every block's self-attention for a :class:`PrefixAttention`; the encoder is ``model.prefix``."""
    mcfg = model.config
    if mcfg.arch != "decoder":
        raise ConfigError("prefix tuning is implemented for decoder models (arch = 'decoder')")
    dev = next(model.parameters()).device
    enc = PrefixEncoder(cfg, mcfg.n_layer, mcfg.n_kv_head, mcfg.head_dim, mcfg.d_model).to(dev)
    if freeze:
        for p in model.parameters():
            p.requires_grad = False
    model.prefix = enc
    ref = [enc]
    for block in model.blocks:
        block.attn = PrefixAttention(block.attn, ref)
    return enc


@torch.no_grad()
def bake_prefix(model: nn.Module) -> None:
    """Replace the reparameterisation MLP by the prefix it produces (same outputs, fewer parameters)."""
    enc: PrefixEncoder = model.prefix
    if enc.table is None:
        table = enc.mlp(enc.embedding).detach()
        enc.table = nn.Parameter(table, requires_grad=False)
        del enc.mlp, enc.embedding
        enc.mlp, enc.embedding = None, None


def remove_prefix(model: nn.Module) -> nn.Module:
    """Put the plain attention layers back (the base model)."""
    for block in model.blocks:
        if isinstance(block.attn, PrefixAttention):
            block.attn = block.attn.attn
    if hasattr(model, "prefix"):
        del model.prefix
    return model
