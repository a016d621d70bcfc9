"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) by module swap.

An adapter is a small residual MLP applied to a sublayer's output, before the block's own residual add:
``h -> h + up(act(down(h)))`` with ``down`` d_model -> ``bottleneck`` and ``up`` back. ``up`` starts at
zero, so the adapted model starts out equal to the base.

Placements:

- ``houlsby``: after the attention output projection and after the FFN (two adapters per block);
- ``pfeiffer``: after the FFN only (one per block; the paper found it as good at half the cost).
  (Pfeiffer's variant also re-uses the block's layer norm inside the adapter; dropped here: the
  adapter works on the sublayer output directly, as in Houlsby.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError


@dataclass
class AdapterConfig:
    bottleneck: int = 32
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    init_std: float = 1e-2

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter.bottleneck: must be >= 1, got {self.bottleneck}")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ConfigError(f"adapter.placement: must be houlsby or pfeiffer, got {self.placement!r}")


class Bottleneck(nn.Module):
    """h (..., C) -> h + up(gelu(down(h)))."""

    def __init__(self, d_model: int, bottleneck: int, init_std: float = 1e-2):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.normal_(self.down.weight, 0.0, init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """A sublayer (attention or FFN) followed by its adapter; same call signature as the sublayer."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.adapter(self.inner(x, *args))


def add_adapters(model: nn.Module, cfg: AdapterConfig, freeze: bool = True) -> int:
    """Insert adapters into every block of ``model`` (in place); returns how many were added."""
    if not hasattr(model, "blocks"):
        raise ConfigError("adapters need a model with transformer blocks (model.blocks)")
    if freeze:
        for p in model.parameters():
            p.requires_grad = False
    d = model.config.d_model
    dev = next(model.parameters()).device
    n = 0
    for block in model.blocks:
        if cfg.placement == "houlsby":
            block.attn = WithAdapter(block.attn, Bottleneck(d, cfg.bottleneck, cfg.init_std).to(dev))
            n += 1
        block.ffn = WithAdapter(block.ffn, Bottleneck(d, cfg.bottleneck, cfg.init_std).to(dev))
        n += 1
    return n


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the plain sublayers back (the base model)."""
    for block in model.blocks:
        for name in ("attn", "ffn"):
            sub = getattr(block, name)
            if isinstance(sub, WithAdapter):
                setattr(block, name, sub.inner)
    return model
