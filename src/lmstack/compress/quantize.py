"""Weight quantization by module swap: :class:`QuantLinear` replaces ``nn.Linear``; the model code never changes.

Formats (``QuantLinear.mode``), all round-to-nearest from the float weight ``W`` (out, in):

- ``int8``: symmetric per output row, ``W ~ q * s_row``, ``s_row = max|W_row| / 127``, q in [-127, 127];
- ``int4``: per group of ``group_size`` consecutive weights of a row. Symmetric: ``W ~ (c - 8) * s``,
  ``s = max|W_g| / 7``, c in [1, 15]; asymmetric: ``W ~ c * s + m``, ``s = (max W_g - min W_g) / 15``,
  ``m = min W_g``, c in [0, 15]. Two codes per byte;
- ``nf4`` (4-bit NormalFloat, QLoRA, Dettmers et al. 2023, section 3): 16 levels at quantiles of N(0, 1)
  scaled to [-1, 1] with an exact zero; each group is divided by its absmax and rounded to the nearest level.
  (The paper's double quantization of the absmax constants is dropped: scales stay fp32.)

Speed comes from the fused kernels torch ships, used when the layer is not being differentiated through:
``torch._weight_int8pack_mm`` for int8 (activations times int8 weights with per-row scales) and
``torch._weight_int4pack_mm_for_cpu`` for int4 (the weight is repacked once, lazily, into the kernel's
layout). NF4 and every training forward (QLoRA needs the input gradient) dequantize and call ``F.linear``.
Gradients flow to the input, never to the codes: they are buffers, not parameters.

Calibrated variants that choose better codes for the same formats live beside this file (``gptq.py``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.swap import set_module

MODES = ("int8", "int4", "nf4")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


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


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15, (..., n) with n even -> (..., n/2) bytes, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize_weight(w: torch.Tensor, mode: str, group_size: int, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes, scales and (asymmetric int4) minima of a weight (out, in); see the module docstring.

    Returns ``codes`` (int8 (out, in) or uint8 unpacked (out, in) for 4-bit), ``scales`` ((out, 1) or
    (out, groups, 1)) and ``mins`` ((out, groups, 1) or None).
    """
    w = w.detach().float()
    if mode == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale, None
    g = w.view(w.shape[0], -1, group_size)                                   # (out, groups, group_size)
    if mode == "nf4":
        absmax = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        levels = nf4_levels().to(w.device)
        codes = ((g / absmax)[..., None] - levels).abs().argmin(dim=-1)    # (out, groups, gs)
        return codes.to(torch.uint8).view(w.shape), absmax, None
    if symmetric:
        scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 7
        codes = (g / scale).round().clamp(-7, 7) + 8
        return codes.to(torch.uint8).view(w.shape), scale, None
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((g - lo) / scale).round().clamp(0, 15)
    return codes.to(torch.uint8).view(w.shape), scale, lo


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized (see the module docstring for the formats)."""

    def __init__(self, in_features: int, out_features: int, mode: str = "int8", group_size: int = 128,
                 bias: bool = False, symmetric: bool = True, use_kernel: bool = True, input_scale: bool = False,
                 activations: str = "float"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"quantization method {mode!r}: use one of {', '.join(MODES)}")
        if mode != "int8" and (group_size < 2 or group_size % 2 or in_features % group_size):
            raise ConfigError(f"quantization group_size={group_size}: must be even and divide the layer's "
                              f"in_features ({in_features}); pick e.g. 32, 64 or 128")
        if activations not in ("float", "int8") or (activations == "int8" and mode != "int8"):
            raise ConfigError(f"quantization activations={activations!r}: 'float', or 'int8' with method int8 (W8A8)")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.activations = activations
        self.group_size = group_size if mode != "int8" else in_features
        self.symmetric = symmetric or mode != "int4"
        self.use_kernel = use_kernel
        if mode == "int8":
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, 1))
        else:
            n_groups = in_features // group_size
            self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups, 1))
            if not self.symmetric:
                self.register_buffer("mins", torch.zeros(out_features, n_groups, 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # AWQ: the input is multiplied by this per-channel factor (1/s) and the stored weight is Q(W diag(s))
        self.input_scale = nn.Parameter(torch.ones(in_features), requires_grad=False) if input_scale else None
        self._kernel_cache: tuple | None = None   # (key, packed weight, scales_and_zeros) for the int4 kernel

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mode: str = "int8", group_size: int = 128, symmetric: bool = True,
                    codes: tuple | None = None, activations: str = "float") -> "QuantLinear":
        """Quantize ``linear`` (round-to-nearest, or the given ``(codes, scales, mins)`` from a calibrated method)."""
        q = cls(linear.in_features, linear.out_features, mode, group_size, bias=linear.bias is not None,
                symmetric=symmetric, activations=activations).to(linear.weight.device)
        c, scales, mins = codes if codes is not None else quantize_weight(linear.weight, mode, group_size, symmetric)
        q.codes.copy_(c if mode == "int8" else pack4(c))
        q.scales.copy_(scales)
        if mins is not None:
            q.mins.copy_(mins)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def _levels(self) -> torch.Tensor:
        """The value of each 4-bit code before scaling (NF4 levels, or c - 8 / c for int4)."""
        if self.mode == "nf4":
            return nf4_levels().to(self.codes.device)
        vals = torch.arange(16, dtype=torch.float32, device=self.codes.device)
        return vals - 8 if self.symmetric else vals

    def stored_weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight the codes stand for, before any AWQ input scale."""
        if self.mode == "int8":
            return self.codes.float() * self.scales
        vals = self._levels()[unpack4(self.codes).long()]                     # (out, in)
        vals = vals.view(self.out_features, -1, self.group_size)              # (out, groups, gs)
        w = vals * self.scales + (self.mins if not self.symmetric else 0.0)
        return w.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer applies (the AWQ input scale folded back in)."""
        w = self.stored_weight()
        if self.input_scale is not None:
            w = w * self.input_scale.float()
        return w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor each time; for code that inspects shapes, dtype, device)."""
        return self.dequantize()

    def kernel_available(self, x: torch.Tensor) -> bool:
        """Whether a fused kernel serves this call: not differentiated through, on the CPU, a supported shape."""
        if not self.use_kernel or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if self.mode == "int8":
            return x.dtype in (torch.float32, torch.bfloat16)
        if self.mode == "int4":
            return (x.dtype in (torch.float32, torch.bfloat16) and self.group_size in INT4_KERNEL_GROUPS
                    and self.in_features % 32 == 0 and self.out_features % 16 == 0)
        return False

    def _w8a8_weights(self) -> Any:
        """The weight prepacked for the quantized engine's dynamic int8 GEMM (fbgemm/oneDNN), built once."""
        if torch.compiler.is_compiling() and self._kernel_cache is not None and self._kernel_cache[0][2] == "w8a8":
            return self._kernel_cache[1]      # prepared before compiling (see _int4_kernel_weights)
        key = (self.codes.data_ptr(), self.scales.data_ptr(), "w8a8")
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            scale = self.scales.view(-1).double()
            bias = self.bias.detach().float() if self.bias is not None else None
            with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the engine is still the
                warnings.simplefilter("ignore")  # fastest int8 GEMM it ships for CPUs (measured in bench/compress.py)
                qw = torch._make_per_channel_quantized_tensor(self.codes, scale, torch.zeros_like(
                    scale, dtype=torch.long), 0)
                self._kernel_cache = (key, torch.ops.quantized.linear_prepack(qw, bias), None)
        return self._kernel_cache[1]

    def prepare_kernels(self, dtype: torch.dtype = torch.float32) -> None:
        """Build the fused kernel's packed weight now (the decode loop calls this before ``torch.compile``)."""
        if self.mode == "int4":
            self._int4_kernel_weights(dtype)
        elif self.activations == "int8":
            self._w8a8_weights()

    def _int4_kernel_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # dynamo cannot trace data_ptr(): a compiled graph uses the packed weight prepared before
            # compiling (prepare_kernels; dynamo guards on the cached tensors, so a rebuilt cache recompiles),
            # else packs inside the graph (correct, but it repacks every call)
            if self._kernel_cache is not None and self._kernel_cache[0][2] == dtype:
                return self._kernel_cache[1], self._kernel_cache[2]
            return self._pack_int4(dtype)
        key = (self.codes.data_ptr(), self.scales.data_ptr(), dtype)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, *self._pack_int4(dtype))
        return self._kernel_cache[1], self._kernel_cache[2]

    def _pack_int4(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 kernel's layout: the packed codes and (groups, out, 2) scales and zeros."""
        codes = unpack4(self.codes).to(torch.int32)                        # (out, in) in [0, 15]
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # the kernel computes w = (c - 8) * s + z per group
        s = self.scales.squeeze(-1)                                        # (out, groups)
        z = torch.zeros_like(s) if self.symmetric else self.mins.squeeze(-1) + 8 * s
        sz = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(dtype)   # (groups, out, 2)
        return packed, sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if not self.kernel_available(x):
            return F.linear(x, self.dequantize(x.dtype), bias)
        shape = x.shape
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        x2 = x.reshape(-1, shape[-1]).contiguous()                             # (N, in)
        if self.activations == "int8" and x2.dtype == torch.float32:
            # W8A8: the input is quantized per tensor on the fly and one int8 GEMM runs (bias included)
            out = torch.ops.quantized.linear_dynamic(x2, self._w8a8_weights())
            return out.view(*shape[:-1], self.out_features)
        if self.mode == "int8":
            out = torch._weight_int8pack_mm(x2, self.codes, self.scales.view(-1).to(x.dtype))
        else:
            packed, sz = self._int4_kernel_weights(x.dtype)
            out = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        if bias is not None:
            out = out + bias
        return out.view(*shape[:-1], self.out_features)

    def dequantized_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored weight (codes + scales (+ minima) + bias)."""
        tensors = [self.codes, self.scales] + ([self.mins] if not self.symmetric else []) + \
            [t for t in (self.bias, self.input_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this layer."""
        return {"mode": self.mode, "group_size": self.group_size, "symmetric": self.symmetric,
                "input_scale": self.input_scale is not None, "activations": self.activations}

    def extra_repr(self) -> str:
        kind = "" if self.mode != "int4" else (", symmetric" if self.symmetric else ", asymmetric")
        kind += ", activations=int8" if self.activations == "int8" else ""
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, group_size={self.group_size}{kind}"


@dataclass
class QuantConfig:
    """What ``quantize_model`` does: the format, the group size, and which linears stay in float."""
    method: Literal["int8", "int4", "nf4"] = "int8"
    group_size: int = 128
    symmetric: bool = True                       # int4 only: symmetric (no zero point) or asymmetric
    skip: tuple[str, ...] = ("lm_head",)         # names (or suffixes) of linears kept in float
    # a layer whose in_features the group size does not divide: an error, one group per row, or int8
    on_mismatch: Literal["error", "row", "int8"] = "error"
    # int8 only: "int8" also quantizes each input on the fly (W8A8, one int8 GEMM on the CPU's quantized
    # engine); "float" keeps activations in float (weight-only)
    activations: Literal["float", "int8"] = "float"

    def __post_init__(self) -> None:
        if self.method not in MODES:
            raise ConfigError(f"quantization method {self.method!r}: use one of {', '.join(MODES)}")
        if self.method != "int8" and (self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"quantization group_size={self.group_size}: must be an even number >= 2")
        if self.activations == "int8" and self.method != "int8":
            raise ConfigError(f"quantization activations='int8' (W8A8) needs method int8, not {self.method!r}")


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` that quantization replaces (all but the skipped names)."""
    skip = tuple(skip)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)]


def layer_format(config: QuantConfig, name: str, in_features: int) -> tuple[str, int]:
    """(mode, group size) for one layer under ``config.on_mismatch`` (see :class:`QuantConfig`)."""
    if config.method == "int8" or in_features % config.group_size == 0:
        return config.method, config.group_size
    if config.on_mismatch == "row" and in_features % 2 == 0:
        return config.method, in_features
    if config.on_mismatch == "int8":
        return "int8", config.group_size
    raise ConfigError(f"quantization group_size={config.group_size} does not divide the in_features "
                      f"({in_features}) of {name!r}; choose a group size that divides it, or set "
                      f"on_mismatch = 'row' (one group per row) or 'int8'")


def plan_layers(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear, str, int]]:
    """``(name, linear, mode, group size)`` of every linear to quantize, all checked before any is touched."""
    targets = quantizable_linears(model, config.skip)
    if not targets:
        raise ConfigError("quantize: the model has no linear layers to quantize (after skipping "
                          f"{', '.join(config.skip) or 'nothing'})")
    return [(name, lin, *layer_format(config, name, lin.in_features)) for name, lin in targets]


def quantize_model(model: nn.Module, config: QuantConfig | None = None, fallback_int8: bool = False
                   ) -> dict[str, dict]:
    """Replace the model's linears by :class:`QuantLinear` in place; return ``{name: spec}`` of what was swapped.

    A layer whose ``in_features`` the group size does not divide follows ``config.on_mismatch``
    (``fallback_int8=True``, QLoRA's choice, is ``on_mismatch="int8"``).
    """
    config = config or QuantConfig()
    if fallback_int8:
        config = dataclasses.replace(config, on_mismatch="int8")
    swapped: dict[str, dict] = {}
    for name, linear, mode, group in plan_layers(model, config):
        q = QuantLinear.from_linear(linear, mode, group, config.symmetric,
                                    activations=config.activations if mode == "int8" else "float")
        set_module(model, name, q)
        swapped[name] = q.spec()
    return swapped


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantLinear` by an ``nn.Linear`` holding its dequantized weight (in place)."""
    for name, q in quantized_layers(model).items():
        set_module(model, name, q.dequantized_linear())
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every unique parameter and persistent buffer (what a checkpoint of the model holds)."""
    seen = {id(t): t for t in model.parameters()}
    for mod in model.modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                seen[id(b)] = b
    return sum(t.numel() * t.element_size() for t in seen.values())
