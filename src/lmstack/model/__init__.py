"""lmstack.model: the transformer family (decoder, encoder, encoder-decoder), its KV cache and HF interop.

    from lmstack.model import ModelConfig, build_model, preset
    model = build_model(preset("tiny"))
    logits, loss = model(input_ids, targets=targets)

Our own checkpoint format is a folder with ``model.safetensors`` and ``model_config.json``
(:func:`save` / :func:`load`); Hugging Face folders go through :mod:`lmstack.model.hf`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.config import from_dict, to_dict
from lmstack.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmstack.model.config import ModelConfig

# Names loaded on first use, so that importing lmstack.model.cli (``lmstack --help``) does not import torch.
_LAZY = {"KVCache": "cache", "PRESETS": "config", "ModelConfig": "config", "preset": "config",
         "init_weights": "layers", "retie_weights": "layers", "sentence_embeddings": "encoder"}

__all__ = ["ModelConfig", "KVCache", "PRESETS", "preset", "build_model", "init_weights", "save", "load",
           "sentence_embeddings", "hf"]


def build_model(config: ModelConfig) -> nn.Module:
    """The model for ``config.arch``, freshly initialised (see :func:`init_weights`), config on ``model.config``."""
    if config.arch == "decoder":
        from lmstack.model.decoder import Decoder
        return Decoder(config)
    if config.arch == "encoder":
        from lmstack.model.encoder import Encoder
        return Encoder(config)
    if config.arch == "encoder-decoder":
        from lmstack.model.seq2seq import Seq2Seq
        return Seq2Seq(config)
    raise ConfigError(f"model config field 'arch': unknown architecture {config.arch!r}")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` into the folder ``path`` (atomically)."""
    from safetensors.torch import save_model

    from lmstack.runs import atomic_path, atomic_write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_model(model, str(tmp))  # handles tied weights (stored once)
    atomic_write_json(path / "model_config.json", to_dict(model.config))
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by :func:`save` (or a ``model.safetensors`` path next to its ``model_config.json``).

    The model is built on the meta device (no random init, no second copy of the weights) and the stored
    tensors are assigned into it, as :func:`lmstack.model.hf.load` does.
    """
    import torch
    from safetensors.torch import load_file

    from lmstack.model.layers import retie_weights

    from lmstack.model.config import ModelConfig
    from lmstack.runs import read_json

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / "model_config.json").is_file():
        raise ConfigError(f"{folder}: no model_config.json (is this an lmstack model folder? "
                          f"Hugging Face folders load with lmstack.model.hf.load)")
    raw = read_json(folder / "model_config.json")
    if "quantization" in raw:
        raise ConfigError(f"{folder}: a quantized model folder; load it with lmstack.compress.load_quantized "
                          f"or lmstack.infer.text.load_run (every lmstack command does)")
    cfg = from_dict(ModelConfig, raw)
    state = load_file(str(folder / "model.safetensors"), device=str(device))
    if dtype is None:  # keep the stored dtype
        dtype = next(iter(state.values())).dtype if state else torch.float32
    with torch.device("meta"):
        model = build_model(cfg)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                                assign=True)
    retie_weights(model)
    if unexpected:
        raise ConfigError(f"{folder}: model.safetensors holds {len(unexpected)} weights the config does not have "
                          f"(e.g. {unexpected[0]!r}); is model_config.json from another model?")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ConfigError(f"{folder}: model.safetensors has no weight for {leftover[0]!r}")
    return model.to(device)


def __getattr__(name: str) -> Any:
    # hf, sentence_embeddings and everything that needs torch load on first use
    if name == "hf":
        return importlib.import_module("lmstack.model.hf")
    if name in _LAZY:
        return getattr(importlib.import_module(f"lmstack.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.model' has no attribute {name!r}")
