"""The frozen, quantized base of QLoRA (Dettmers et al. 2023): the one quantized linear of
:mod:`lmstack.compress.quantize`, applied to the linears inside the blocks, so the base costs 1 or ~0.56
bytes a weight instead of 4 (fp32) or 2 (bf16). Gradients reach the input (LoRA's A needs them), never
the codes."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lmstack.compress.quantize import QuantConfig, QuantLinear, nf4_levels, quantize_model

__all__ = ["QuantLinear", "nf4_levels", "quantize_base", "base_bytes"]


def quantize_base(model: nn.Module, mode: Literal["int8", "int4", "nf4"] = "nf4", group_size: int = 64,
                  skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` but ``skip`` by a :class:`QuantLinear`; returns the count.

    The embeddings, norms and (tied) output head stay in full precision, as in QLoRA. A layer whose
    width the group size does not divide falls back to per-row int8.
    """
    return len(quantize_model(model, QuantConfig(mode, group_size, True, skip), fallback_int8=True))


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base: every unique parameter and buffer except LoRA/prefix/adapter tensors."""
    seen: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not any(k in name for k in (".lora_", "prefix", "adapter")):
            seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())
