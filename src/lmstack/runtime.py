"""Seeding and device selection: the two runtime choices every layer shares."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from lmstack.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is not available is a user error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"device: unknown device {name!r}; use one of {', '.join(DEVICES)} or cuda:N")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype that suits a device: bf16 on CUDA that supports it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name from a config (``bf16``, ``float32``...) to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype: unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
