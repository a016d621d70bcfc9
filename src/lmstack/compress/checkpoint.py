"""Quantized model folders: ``model.safetensors`` (codes, scales, float tensors) + ``model_config.json``.

The config is the model's own, plus a ``quantization`` block naming every swapped layer and its format::

    {"arch": "decoder", ..., "quantization": {"method": "int4", "group_size": 64, "symmetric": true,
                                              "layers": {"blocks.0.attn.qkv": {"mode": "int4", ...}, ...}}}

:func:`load_quantized` rebuilds the float skeleton on the meta device, swaps in empty :class:`QuantLinear`
shells where the block says, and assigns the stored tensors, so nothing is quantized twice and no float
copy of the weights is ever made. Any loader that meets such a folder (``lmstack.infer.text.load_run``, so
every command) comes here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.compress.quantize import QuantLinear, quantized_layers
from lmstack.config import from_dict, to_dict
from lmstack.errors import ConfigError
from lmstack.model.swap import set_module


def is_quantized_folder(path: str | os.PathLike) -> bool:
    from lmstack.runs import read_json

    cfg = Path(path) / "model_config.json"
    return cfg.is_file() and "quantization" in read_json(cfg)


def save_quantized(model: nn.Module, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write a quantized model (one that holds :class:`QuantLinear` layers) to the folder ``path``, atomically."""
    from safetensors.torch import save_model

    from lmstack.runs import atomic_dir, atomic_write_json

    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("save_quantized: the model holds no quantized layer; run quantize_model first")
    block = {**(info or {}), "layers": {name: q.spec() for name, q in layers.items()}}
    with atomic_dir(Path(path)) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "model_config.json", {**to_dict(model.config), "quantization": block})
    return Path(path)


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_quantized`; errors name the field that does not fit."""
    from safetensors.torch import load_file

    from lmstack.model import ModelConfig, build_model
    from lmstack.model.layers import retie_weights
    from lmstack.runs import read_json

    folder = Path(path)
    raw = read_json(folder / "model_config.json")
    block = raw.pop("quantization", None)
    if not isinstance(block, dict) or not isinstance(block.get("layers"), dict):
        raise ConfigError(f"{folder}/model_config.json: field 'quantization.layers' is missing; "
                          f"is this a folder written by `lmstack compress quantize`?")
    cfg = from_dict(ModelConfig, raw)
    state = load_file(str(folder / "model.safetensors"), device=str(device))
    with torch.device("meta"):
        model = build_model(cfg)
    for name, spec in block["layers"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{folder}: field 'quantization.layers.{name}' names no layer of this model config "
                              f"(was model_config.json edited?)") from None
        if not isinstance(spec, dict) or spec.get("mode") not in ("int8", "int4", "nf4"):
            raise ConfigError(f"{folder}: field 'quantization.layers.{name}.mode' must be int8, int4 or nf4")
        with torch.device("meta"):
            shell = QuantLinear(linear.in_features, linear.out_features, spec["mode"],
                                int(spec.get("group_size", 128)), bias=linear.bias is not None,
                                symmetric=bool(spec.get("symmetric", True)),
                                input_scale=bool(spec.get("input_scale", False)),
                                activations=str(spec.get("activations", "float")))
        set_module(model, name, shell)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a stored tensor's shape differs from what the config builds
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ConfigError(f"{folder}: model_config.json does not match the stored weights ({line}); "
                          f"was the config edited?") from None
    retie_weights(model)
    if unexpected:
        raise ConfigError(f"{folder}: stored tensor {unexpected[0]!r} has no place in the model config "
                          f"(was model_config.json edited?)")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ConfigError(f"{folder}: no stored tensor for {leftover[0]!r} (was model_config.json edited?)")
    model.quantization = {k: v for k, v in block.items() if k != "layers"}
    return model.to(device).eval()
