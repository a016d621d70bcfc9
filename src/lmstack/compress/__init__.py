"""lmstack.compress: model transforms that make a model smaller and faster, by module swap.

    from lmstack.compress import QuantConfig, quantize_model, save_quantized, load_quantized
    quantize_model(model, QuantConfig(method="int4", group_size=64))
    save_quantized(model, "runs/int4")            # safetensors + model_config.json with a quantization block

Quantization: :mod:`lmstack.compress.quantize` (int8, int4, NF4; fused CPU kernels where torch has them).
"""

from lmstack.compress.quantize import (QuantConfig, QuantLinear, dequantize_model, model_bytes, nf4_levels,
                                       quantize_model, quantized_layers)

__all__ = ["QuantConfig", "QuantLinear", "dequantize_model", "model_bytes", "nf4_levels", "quantize_model",
           "quantized_layers", "save_quantized", "load_quantized"]


def __getattr__(name: str):
    if name in ("save_quantized", "load_quantized"):
        from lmstack.compress import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'lmstack.compress' has no attribute {name!r}")
