"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a layer's weight one column at a time and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

For a linear layer with inputs X (in, n) the loss of a quantized weight Q is ``||W X - Q X||^2``; its Hessian
is ``H = 2 X X^T`` (in, in). Quantizing column q to ``quant(w_q)`` and re-optimising the remaining columns F
(Optimal Brain Surgeon, the paper's eq. 2-3) gives

    delta_F = - (w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{q, F}
    H_{F - q}^-1 = H_F^-1 - (H_F^-1)_{:, q} (H_F^-1)_{q, :} / [H_F^-1]_qq

GPTQ's three practical steps, all here: (1) every row uses the same column order, so one inverse serves
all rows; (2) the sequence of inverses is read off the upper Cholesky factor U of ``H^-1`` (row q of U,
divided by U_qq, is the update above), and updates are applied lazily in blocks of ``block_size`` columns;
(3) damping: ``H += damp * mean(diag H) * I`` keeps the factorisation stable. "act-order" quantizes the
columns with the largest ``diag H`` first.

Kept simple here, and said so: the group scales are computed from the float weight before any update
("static groups"), so the stored format is exactly the round-to-nearest one (and the fused kernels serve
it); the Hessians of all layers come from one pass of the float model over the calibration data, not
block by block through the already quantized model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmstack.compress.calib import accumulate, flat_input
from lmstack.compress.quantize import QuantConfig, QuantLinear, nf4_levels, plan_layers, quantize_weight
from lmstack.errors import ConfigError
from lmstack.model.swap import set_module


def _round(w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, mode: str, symmetric: bool
           ) -> torch.Tensor:
    """Codes of a column ``w`` (out,) given its groups' ``scale`` (and ``mins``), per the RTN format."""
    if mode == "int8":
        return (w / scale).round().clamp(-127, 127)
    if mode == "nf4":
        levels = nf4_levels().to(w.device)
        return ((w / scale)[:, None] - levels).abs().argmin(dim=-1).float()
    if symmetric:
        return (w / scale).round().clamp(-7, 7) + 8
    return ((w - mins) / scale).round().clamp(0, 15)


def _value(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, mode: str, symmetric: bool
           ) -> torch.Tensor:
    if mode == "int8":
        return codes * scale
    if mode == "nf4":
        return nf4_levels().to(codes.device)[codes.long()] * scale
    return (codes - 8) * scale if symmetric else codes * scale + mins


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, mode: str = "int4", group_size: int = 128,
                  symmetric: bool = True, damp: float = 0.01, act_order: bool = True, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes for ``weight`` (out, in) under ``hessian`` (in, in); same return as ``quantize_weight``."""
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0                                       # inputs that never fire: weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # static groups: scales from the (float) weight before any error compensation
    _, scales, mins = quantize_weight(w.float(), mode, group_size if mode != "int8" else in_f, symmetric)
    col_group = torch.arange(in_f) // (group_size if mode != "int8" else in_f)
    scale_cols = scales.double().view(out_f, -1)[:, col_group]       # (out, in): each column's scale
    min_cols = mins.double().view(out_f, -1)[:, col_group] if mins is not None else None
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    w, h = w[:, order], h[order][:, order]
    scale_cols = scale_cols[:, order]
    min_cols = min_cols[:, order] if min_cols is not None else None
    h += damp * torch.diag(h).mean() * torch.eye(in_f, dtype=h.dtype)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise ConfigError(f"gptq: the Hessian is not positive definite even with damping {damp}; "
                          f"raise the damping or add calibration data") from None
    codes = torch.zeros_like(w)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        err = torch.zeros(out_f, b1 - b0, dtype=w.dtype)
        for i in range(b0, b1):
            col = w[:, i]
            mn = min_cols[:, i] if min_cols is not None else None
            c = _round(col, scale_cols[:, i], mn, mode, symmetric)
            codes[:, i] = c
            e = (col - _value(c, scale_cols[:, i], mn, mode, symmetric)) / u[i, i]
            w[:, i + 1:b1] -= e[:, None] * u[i, i + 1:b1][None, :]    # the OBS update inside the block
            err[:, i - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]                                 # the block's updates, applied lazily
    codes = codes[:, torch.argsort(order)]                              # back to the stored column order
    dtype = torch.int8 if mode == "int8" else torch.uint8
    return codes.to(dtype), scales, mins


def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, mode: str = "int4", group_size: int = 32,
                   symmetric: bool = True, damp: float = 0.01) -> torch.Tensor:
    """The paper's update written out directly (eq. 2-3, one column at a time, the inverse Hessian downdated
    after each column, natural order): the check that :func:`gptq_quantize` computes the same codes."""
    w = weight.detach().double().clone()
    out_f, in_f = w.shape
    h = hessian.detach().double().clone()
    h += damp * torch.diag(h).mean() * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    _, scales, mins = quantize_weight(w.float(), mode, group_size, symmetric)
    groups = torch.arange(in_f) // group_size
    codes = torch.zeros_like(w)
    for q in range(in_f):
        s = scales.double().view(out_f, -1)[:, groups[q]]
        mn = mins.double().view(out_f, -1)[:, groups[q]] if mins is not None else None
        c = _round(w[:, q], s, mn, mode, symmetric)
        codes[:, q] = c
        e = (w[:, q] - _value(c, s, mn, mode, symmetric)) / hinv[q, q]
        w[:, q + 1:] -= e[:, None] * hinv[q, q + 1:][None, :]
        hinv = hinv - hinv[:, q:q + 1] @ hinv[q:q + 1, :] / hinv[q, q]
    return codes


def input_hessians(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``H = 2 X X^T / n`` for the inputs X of each named linear, over the calibration ``batches`` of ids."""
    def xtx(inputs, output):
        x = flat_input(inputs).double()                                         # (N, in)
        return x.t() @ x, x.shape[0]

    sums, counts = accumulate(model, {name: xtx for name in names}, batches, who="gptq")
    return {n: 2 * sums[n] / counts[n] for n in sums}


def gptq_model(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig | None = None,
               damp: float = 0.01, act_order: bool = True) -> dict[str, dict]:
    """Quantize the model's linears with GPTQ in place (calibrated on ``batches`` of token ids, (B, T) each)."""
    config = config or QuantConfig("int4", 128)
    layers = plan_layers(model, config)
    hessians = input_hessians(model, [name for name, *_ in layers], batches)
    swapped = {}
    for name, lin, mode, group in layers:
        codes = gptq_quantize(lin.weight, hessians[name], mode, group, config.symmetric, damp, act_order)
        q = QuantLinear.from_linear(lin, mode, group, config.symmetric, codes=codes)
        set_module(model, name, q)
        swapped[name] = q.spec()
    return swapped
