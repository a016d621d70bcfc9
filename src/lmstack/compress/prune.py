"""Unstructured and semi-structured pruning: zero the least important weights of the linear layers.

A mask keeps each weight (True) or zeroes it (False); :func:`apply_masks` writes the zeros into the weights,
so the model code never changes and the result saves and loads like any other model. Zeros alone are not a
speed-up on dense kernels: for a smaller, faster dense model see :mod:`lmstack.compress.prune_structured`.

Scores (larger = keep):

- ``magnitude``: ``S_ij = |W_ij|`` (Han et al. 2015, "Learning both Weights and Connections");
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  ``S_ij = |W_ij| * ||X_j||_2``, the weight times the L2 norm of input channel j over the N calibration
  tokens (X: (N, in), collected with forward hooks, :func:`lmstack.compress.calib.accumulate`). The paper
  compares scores per output row ("per output"), which is what ``scope="layer"`` does for Wanda.

Where the comparison happens (``scope``):

- ``layer``: every layer reaches the requested sparsity on its own: magnitude over the whole matrix,
  Wanda within each output row (its paper's comparison group);
- ``global``: one ranking over the scores of all layers together; layers end up with different sparsities.

Exactly ``sparsity * n`` weights (rounded half up) of each comparison group are pruned (ties broken by position), so the
achieved sparsity is the requested one to within one weight per group, whatever the weights' values.

Semi-structured N:M (``pattern="2:4"``, Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"):
in every group of M consecutive input weights of a row keep the N with the largest scores (50% for 2:4;
the pattern NVIDIA's sparse tensor cores run). The sparsity is then (M - N) / M, not a free parameter.

Gradual pruning follows the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune"),
:func:`cubic_sparsity`: ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / T)^3`` for t_0 <= t <= t_0 + T.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from lmstack.compress.calib import accumulate, flat_input
from lmstack.compress.quantize import quantizable_linears
from lmstack.errors import ConfigError

SKIP = ("lm_head", "router")      # the output head and MoE routers are small and sensitive: kept dense


def check_fraction(field: str, value: float) -> float:
    """A pruning fraction must lie in [0, 1); a ConfigError naming ``field`` otherwise."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"prune: {field} must be a fraction in [0, 1) (got {value!r})")
    return float(value)


def n_of(fraction: float, total: int) -> int:
    """``fraction * total`` rounded half up (not to even): the number of units a fraction removes."""
    return int(fraction * total + 0.5)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M): keep N of every M consecutive weights; 0 < N < M."""
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"prune: pattern must look like N:M, e.g. 2:4 (got {pattern!r})") from None
    if not 0 < n < m:
        raise ConfigError(f"prune: pattern {pattern!r} must keep 0 < N < M weights of every M")
    return n, m


def cubic_sparsity(step: int, final: float, total_steps: int, initial: float = 0.0, start: int = 0) -> float:
    """Zhu & Gupta 2017's gradual schedule: ``s_f + (s_i - s_f) (1 - (step - start) / total_steps)^3``,
    ``initial`` before ``start``, ``final`` from ``start + total_steps`` on. Prune to it every few steps."""
    check_fraction("final", final)
    check_fraction("initial", initial)
    if total_steps < 1:
        raise ConfigError(f"prune: total_steps must be a positive integer (got {total_steps!r})")
    progress = min(max((step - start) / total_steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_linears(model: nn.Module, skip: Iterable[str] = SKIP) -> list[tuple[str, nn.Linear]]:
    """The linear layers pruning touches (all but the ``skip`` names or name suffixes)."""
    return quantizable_linears(model, skip)


@torch.no_grad()
def input_norms(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input channel j of each named linear over all calibration tokens (Wanda's statistic)."""
    def sq(inputs, output):
        x = flat_input(inputs).double()
        return x.pow(2).sum(dim=0), x.shape[0]

    sums, _ = accumulate(model, {n: sq for n in names}, batches, who="prune")
    return {n: sums[n].sqrt().float() if n in sums else torch.zeros(model.get_submodule(n).in_features)
            for n in names}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for a weight (out, in) and its input-channel norms (in,)."""
    return weight.detach().abs().float() * norms.float()[None, :]


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (True = keep) of a flat score vector with its k smallest entries dropped, ties by position."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.flatten(), stable=True).indices
        keep[order[:k]] = False
    return keep.view(scores.shape)


def _lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (out, in) with the k smallest scores of every row dropped, ties by position."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        drop = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, drop, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores of every m consecutive entries along the last dim (in_features % m == 0)."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.view(out_f, in_f)


def unstructured_masks(model: nn.Module, sparsity: float = 0.5, method: Literal["magnitude", "wanda"] = "magnitude",
                       batches: Iterable[torch.Tensor] | None = None, scope: Literal["layer", "global"] = "layer",
                       pattern: str | None = None, skip: Iterable[str] = SKIP) -> dict[str, torch.Tensor]:
    """Keep-masks ``{linear name: bool (out, in)}``; see the module docstring for the scores and scopes.

    ``method="wanda"`` needs calibration ``batches`` (what ``model(batch)`` takes, e.g. (1, T) ids).
    With ``pattern`` ("N:M") the mask is semi-structured and ``sparsity`` is ignored.
    """
    if method not in ("magnitude", "wanda"):
        raise ConfigError(f"prune: method must be magnitude or wanda (got {method!r})")
    if scope not in ("layer", "global"):
        raise ConfigError(f"prune: scope must be layer or global (got {scope!r})")
    nm = parse_pattern(pattern) if pattern else None
    if nm is None:
        check_fraction("sparsity", sparsity)
    targets = prunable_linears(model, skip)
    if not targets:
        raise ConfigError("prune: the model has no linear layers to prune")
    if nm is not None:
        for name, lin in targets:
            if lin.in_features % nm[1]:
                raise ConfigError(f"prune: pattern {pattern} needs in_features divisible by {nm[1]}; "
                                  f"{name!r} has {lin.in_features}")
    if method == "wanda":
        if batches is None:
            raise ConfigError("prune: method wanda needs calibration data (--calib FILES)")
        norms = input_norms(model, [n for n, _ in targets], batches)
        scores = {n: wanda_scores(lin.weight, norms[n]) for n, lin in targets}
    else:
        scores = {n: lin.weight.detach().abs().float() for n, lin in targets}
    if nm is not None:
        return {n: nm_mask(s, *nm) for n, s in scores.items()}
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = _lowest(flat, n_of(sparsity, flat.numel()))
        masks, at = {}, 0
        for n, s in scores.items():
            masks[n] = keep[at:at + s.numel()].view(s.shape)
            at += s.numel()
        return masks
    if method == "wanda":   # per output row, as in the paper
        return {n: _lowest_per_row(s, n_of(sparsity, s.shape[1])) for n, s in scores.items()}
    return {n: _lowest(s, n_of(sparsity, s.numel())) for n, s in scores.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights the masks drop, in place (biases are kept)."""
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(mask.to(w.device, w.dtype))


def prune_unstructured(model: nn.Module, sparsity: float = 0.5, method: Literal["magnitude", "wanda"] = "magnitude",
                       batches: Iterable[torch.Tensor] | None = None, scope: Literal["layer", "global"] = "layer",
                       pattern: str | None = None, skip: Iterable[str] = SKIP) -> dict[str, torch.Tensor]:
    """Compute the masks (:func:`unstructured_masks`), zero the pruned weights in place, return the masks."""
    masks = unstructured_masks(model, sparsity, method, batches, scope, pattern, skip)
    apply_masks(model, masks)
    return masks


def sparsity_report(model: nn.Module, skip: Iterable[str] = SKIP) -> dict[str, float]:
    """Fraction of exactly-zero weights of each prunable linear, and ``"total"`` over all of them."""
    out: dict[str, float] = {}
    zeros = total = 0
    for name, lin in prunable_linears(model, skip):
        z = int((lin.weight == 0).sum())
        out[name] = z / lin.weight.numel()
        zeros, total = zeros + z, total + lin.weight.numel()
    out["total"] = zeros / total if total else 0.0
    return out
