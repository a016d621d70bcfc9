"""lmstack.compress: model transforms that make a model smaller and faster, by module swap.

    from lmstack.compress import QuantConfig, quantize_model, save_quantized, load_quantized
    quantize_model(model, QuantConfig(method="int4", group_size=64))
    save_quantized(model, "runs/int4")            # safetensors + model_config.json with a quantization block

- quantization: :mod:`~lmstack.compress.quantize` (int8, int4, NF4; fused CPU kernels where torch has them),
  :mod:`~lmstack.compress.gptq`, :mod:`~lmstack.compress.awq`, :mod:`~lmstack.compress.checkpoint`;
- pruning: :mod:`~lmstack.compress.prune` (magnitude, Wanda, N:M) and :mod:`~lmstack.compress.prune_structured`
  (heads, FFN neurons, layers -> a smaller dense model);
- calibration hooks: :mod:`~lmstack.compress.calib`. What it all cost is measured by
  :mod:`lmstack.eval.compression` (``lmstack compress report``).
"""

from __future__ import annotations

import importlib
from typing import Any

# loaded on first use, so that ``lmstack --help`` (which imports lmstack.compress.cli) does not import torch
_LAZY = {
    "QuantConfig": "quantize", "QuantLinear": "quantize", "dequantize_model": "quantize", "model_bytes": "quantize",
    "nf4_levels": "quantize", "quantize_model": "quantize", "quantized_layers": "quantize",
    "save_quantized": "checkpoint", "load_quantized": "checkpoint", "is_quantized_folder": "checkpoint",
    "gptq_model": "gptq", "awq_model": "awq",
    "prune_unstructured": "prune", "sparsity_report": "prune", "prune_structured": "prune_structured",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lmstack.compress.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.compress' has no attribute {name!r}")
