"""The frozen, quantized base of QLoRA (Dettmers et al. 2023): weights stored in 8 or 4 bits, dequantized
on the fly in each forward, so the base costs 1 or ~0.56 bytes a weight instead of 4 (fp32) or 2 (bf16).

Formats (``QuantLinear.mode``):

- ``int8``: symmetric, one fp32 scale per output row: ``w ~ q * absmax_row / 127``, q in [-127, 127];
- ``int4``: symmetric, one scale per ``group_size`` consecutive weights of a row: q in [-8, 7], scale
  ``absmax / 7``; two codes per byte;
- ``nf4`` (4-bit NormalFloat, the QLoRA paper, section 3): 16 levels placed at quantiles of N(0, 1)
  scaled to [-1, 1], with an exact zero; each group is divided by its absmax and rounded to the nearest
  level; two codes per byte. (The paper's "double quantization" of the absmax constants is dropped:
  scales stay fp32, which costs 0.5 bit a weight at group size 64.)

Gradients flow through the dequantized weight to the input (LoRA's A needs them) but the codes never
change: they are buffers, not parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError

MODES = ("int8", "int4", "nf4")


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values: 8 positive and 7 negative normal quantiles (plus 0), each side scaled to [-1, 1].

    With ``offset = 0.9677`` (the paper's choice, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2), positive levels are
    ``Phi^-1`` at 8 evenly spaced probabilities from ``offset`` to 0.5 and negative ones at 7; the result
    equals bitsandbytes' table to fp32 precision (tested).
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15, (..., n) with n even -> (..., n/2) bytes, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized; ``forward`` dequantizes it to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, mode: str = "nf4", group_size: int = 64,
                 bias: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"quantization mode {mode!r}: use one of {', '.join(MODES)}")
        if mode != "int8" and (group_size < 2 or group_size % 2 or in_features % group_size):
            raise ConfigError(f"quant group_size={group_size} must be even and divide the layer's in_features "
                              f"({in_features})")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, 1))
        else:
            n_groups = in_features // group_size
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups, 1))
        self.register_buffer("levels", nf4_levels() if mode == "nf4" else torch.zeros(0), persistent=False)
        # byte -> its two values (low nibble first): dequantizing is then one gather per byte
        if mode != "int8":
            vals = self.levels if mode == "nf4" else torch.arange(16, dtype=torch.float32) - 8
            byte = torch.arange(256)
            self.register_buffer("pairs", torch.stack([vals[byte & 0x0F], vals[byte >> 4]], dim=-1),
                                 persistent=False)                               # (256, 2)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mode: str = "nf4", group_size: int = 64) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, mode, group_size, bias=linear.bias is not None)
        q = q.to(linear.weight.device)
        w = linear.weight.detach().float()                                   # (out, in)
        if mode == "int8":
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            q.codes.copy_((w / scale).round().clamp(-127, 127).to(torch.int8))
        else:
            g = w.view(w.shape[0], -1, group_size)                            # (out, groups, group_size)
            absmax = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
            if mode == "int4":
                scale = absmax / 7
                codes = ((g / scale).round().clamp(-8, 7) + 8).to(torch.uint8)
            else:
                scale = absmax
                dist = ((g / absmax)[..., None] - q.levels.to(w.device)).abs()   # (out, groups, gs, 16)
                codes = dist.argmin(dim=-1).to(torch.uint8)
            q.codes.copy_(_pack4(codes.view(w.shape[0], -1)))
        q.scales.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the codes stand for."""
        if self.mode == "int8":
            return (self.codes.float() * self.scales).to(dtype)
        vals = self.pairs[self.codes.long()]                                      # (out, in/2, 2)
        vals = vals.view(self.out_features, -1, self.group_size)                  # (out, groups, gs)
        return (vals * self.scales).view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor each time; for code that inspects shapes, dtype, device)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def dequantized_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored weight (codes + scales + bias)."""
        tensors = [self.codes, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, group_size={self.group_size}"


def quantize_base(model: nn.Module, mode: Literal["int8", "int4", "nf4"] = "nf4", group_size: int = 64,
                  skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` inside the transformer blocks by a :class:`QuantLinear`; returns the count.

    The embeddings, norms and (tied) output head stay in full precision, as in QLoRA. A layer whose
    width the group size does not divide falls back to per-row int8.
    """
    from lmstack.finetune.lora import _set_module

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name == s or name.endswith("." + s) for s in skip):
            continue
        m = mode if mode == "int8" or module.in_features % group_size == 0 else "int8"
        _set_module(model, name, QuantLinear.from_linear(module, m, group_size))
        n += 1
    return n


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base: every unique parameter and buffer except LoRA/prefix/adapter tensors."""
    seen: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not any(k in name for k in (".lora_", "prefix", "adapter")) and not name.endswith(("levels", "pairs")):
            seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())
