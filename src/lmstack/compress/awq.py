"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
protect the weights that meet large activations by scaling them up before rounding.

A few input channels carry much larger activations than the rest, so the rounding error of their weights
costs the most. For a per-input-channel scale ``s > 0``, ``W x = (W diag(s)) (diag(s)^-1 x)``: quantizing
``W diag(s)`` instead of ``W`` shrinks the relative error of the scaled-up columns. AWQ sets

    s_j = a_j^alpha / sqrt(max_j a_j^alpha * min_j a_j^alpha),    a_j = mean over tokens of |x_j|

and picks ``alpha`` in [0, 1] on a grid to minimise the layer's output error on calibration inputs,

    || Q(W diag(s)) diag(s)^-1 X - W X ||^2 .

``alpha = 0`` is plain round-to-nearest, so the search never does worse than it on the calibration data.

Kept simple here, and said so: ``1/s`` is stored with the layer (``QuantLinear.input_scale``, one multiply
of the input per call) instead of being folded into the preceding norm or linear, so every linear can be
scaled independently; the weight-clipping search of the paper's code is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmstack.compress.calib import accumulate, flat_input
from lmstack.compress.quantize import QuantConfig, QuantLinear, plan_layers
from lmstack.model.swap import set_module


def _fake_quant(w: torch.Tensor, mode: str, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest then back to float: what the layer would compute with (codes never stored)."""
    probe = QuantLinear.from_linear(_as_linear(w), mode, group_size, symmetric)
    return probe.stored_weight()


def _as_linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def awq_search(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, mode: str = "int4",
               group_size: int = 128, symmetric: bool = True, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The scale ``s`` (in,) minimising the output error; returns (s, alpha, error).

    The error of a weight ``Q`` over the calibration inputs, ``mean ||(Q - W) x||^2``, is
    ``trace((Q - W) H (Q - W)^T)`` with ``H = E[x x^T]`` (in, in), so the search needs only ``H`` and the mean
    absolute activation per channel ``act_mean`` (in,), both from one pass (:func:`input_stats`).
    """
    w = weight.detach().double()
    h = hessian.double()
    act = act_mean.double().clamp(min=1e-8)
    best = (torch.ones_like(act), 0.0, float("inf"))
    for k in range(grid + 1):
        alpha = k / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = _fake_quant((w * s).float(), mode, group_size, symmetric).double() / s    # the weight applied
        d = q - w
        err = float(((d @ h) * d).sum())                                     # mean over tokens of ||d x||^2
        if err < best[2]:
            best = (s.float(), alpha, err)
    return best


def input_stats(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(E[x x^T], E|x|)`` of the inputs of each named linear over the calibration ``batches``."""
    def stats(inputs, output):
        x = flat_input(inputs).double()                                         # (N, in)
        return torch.cat([x.t() @ x, x.abs().sum(0, keepdim=True)]), x.shape[0]

    sums, counts = accumulate(model, {name: stats for name in names}, batches, who="awq")
    return {n: (sums[n][:-1] / counts[n], sums[n][-1] / counts[n]) for n in sums}


def awq_model(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig | None = None,
              grid: int = 20) -> dict[str, dict]:
    """Quantize the model's linears with AWQ scaling in place; ``{name: spec + chosen alpha}``."""
    config = config or QuantConfig("int4", 128)
    layers = plan_layers(model, config)
    stats = input_stats(model, [name for name, *_ in layers], batches)
    swapped = {}
    for name, lin, mode, group in layers:
        hessian, act_mean = stats[name]
        s, alpha, _ = awq_search(lin.weight, hessian, act_mean, mode, group, config.symmetric, grid)
        scaled = _as_linear(lin.weight.detach().float() * s)
        if lin.bias is not None:
            scaled.bias = nn.Parameter(lin.bias.detach().clone())
        q = QuantLinear.from_linear(scaled, mode, group, config.symmetric)
        q.input_scale = nn.Parameter((1.0 / s).to(q.scales), requires_grad=False)
        set_module(model, name, q.to(lin.weight.device))
        swapped[name] = {**q.spec(), "alpha": alpha}
    return swapped


__all__ = ["awq_model", "awq_search", "input_stats"]
