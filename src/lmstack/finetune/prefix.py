"""Prefix tuning (Li & Liang 2021): trainable virtual keys and values prepended in every attention layer.

Each layer's self-attention sees ``n_prefix`` extra key/value slots before the real tokens; every query
may attend to them; the model's weights stay frozen. The prefix is either free parameters per layer,
``(n_kv_head, P, head_dim)`` for K and for V, or (``reparam=True``, the paper's stabiliser) produced by a
small MLP from a ``(P, d_model)`` embedding: ``MLP: d_model -> hidden -> n_layer * 2 * kv_dim``. After
training the MLP can be dropped by :func:`bake_prefix`, which stores its output as plain tensors.

Implementation: the model's own hook, ``Attention.prefix_kv`` (see :func:`lmstack.model.layers.prepend_kv`):
each self-attention layer asks a :class:`LayerPrefix` for its (k, v) at every call and puts them before
its keys (keys are stored already rotated, so RoPE models give the prefix no position; real tokens keep
positions 0, 1, ...). Works with the KV cache: the prefix is not cached, it is prepended at every call.
The module tree, and so the base weights' names, stay those of the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.layers import Attention


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


class LayerPrefix:
    """One layer's view of the shared :class:`PrefixEncoder`: the callable ``Attention.prefix_kv`` expects.

    A plain object, not a module, so the encoder is registered once (as ``model.prefix``), not per layer."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(self.layer)                                    # (G, P, D) each


def _self_attentions(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention) and not m.cross]


def add_prefix(model: nn.Module, cfg: PrefixConfig, freeze: bool = True) -> PrefixEncoder:
    """Give every self-attention layer the prefix (through its ``prefix_kv`` hook); the encoder is
    ``model.prefix``."""
    mcfg = model.config
    if mcfg.arch != "decoder":
        raise ConfigError("prefix tuning is implemented for decoder models (arch = 'decoder')")
    dev = next(model.parameters()).device
    enc = PrefixEncoder(cfg, mcfg.n_layer, mcfg.n_kv_head, mcfg.head_dim, mcfg.d_model).to(dev)
    if freeze:
        for p in model.parameters():
            p.requires_grad = False
    model.prefix = enc
    for attn in _self_attentions(model):
        attn.prefix_kv = LayerPrefix(enc, attn.layer_idx)
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
    """Take the prefix out of every attention layer (the base model)."""
    for attn in _self_attentions(model):
        attn.prefix_kv = None
    if hasattr(model, "prefix"):
        del model.prefix
    return model
