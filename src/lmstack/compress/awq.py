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

from lmstack.compress.quantize import QuantConfig, QuantLinear, layer_format, quantizable_linears
from lmstack.errors import ConfigError, DataError
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


def awq_search(weight: torch.Tensor, inputs: torch.Tensor, mode: str = "int4", group_size: int = 128,
               symmetric: bool = True, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The scale ``s`` (in,) minimising the output error over ``inputs`` (N, in); returns (s, alpha, error)."""
    w = weight.detach().float()
    x = inputs.float()
    target = x @ w.t()                                                     # (N, out)
    act = x.abs().mean(dim=0).clamp(min=1e-8)                              # (in,)
    best = (torch.ones_like(act), 0.0, float("inf"))
    for k in range(grid + 1):
        alpha = k / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = _fake_quant(w * s, mode, group_size, symmetric) / s            # the weight the layer applies
        err = float((x @ q.t() - target).pow(2).mean())
        if err < best[2]:
            best = (s, alpha, err)
    return best


@torch.no_grad()
def collect_inputs(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor], max_rows: int = 4096,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows (seeded reservoir of tokens) seen by each named linear over ``batches``."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)
    hooks = []

    def hook(name: str):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            keep = torch.randperm(x.shape[0], generator=gen)[: max(1, max_rows // 8)]
            rows[name].append(x[keep])
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        n = 0
        for ids in batches:
            model(ids)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not n:
        raise DataError("awq: the calibration data is empty; pass --calib with some text")
    return {name: torch.cat(r)[:max_rows] for name, r in rows.items()}


def awq_model(model: nn.Module, batches: Iterable[torch.Tensor], config: QuantConfig | None = None,
              grid: int = 20) -> dict[str, dict]:
    """Quantize the model's linears with AWQ scaling in place; ``{name: spec + chosen alpha}``."""
    config = config or QuantConfig("int4", 128)
    targets = quantizable_linears(model, config.skip)
    if not targets:
        raise ConfigError("quantize: the model has no linear layers to quantize")
    formats = {name: layer_format(config, name, lin.in_features) for name, lin in targets}
    inputs = collect_inputs(model, [n for n, _ in targets], batches)
    swapped = {}
    for name, lin in targets:
        mode, group = formats[name]
        s, alpha, _ = awq_search(lin.weight, inputs[name], mode, group, config.symmetric, grid)
        scaled = _as_linear(lin.weight.detach().float() * s)
        if lin.bias is not None:
            scaled.bias = nn.Parameter(lin.bias.detach().clone())
        q = QuantLinear.from_linear(scaled, mode, group, config.symmetric)
        q.input_scale = nn.Parameter((1.0 / s).to(q.scales), requires_grad=False)
        set_module(model, name, q.to(lin.weight.device))
        swapped[name] = {**q.spec(), "alpha": alpha}
    return swapped


__all__ = ["awq_model", "awq_search", "collect_inputs"]
