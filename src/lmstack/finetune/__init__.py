"""lmstack.finetune: supervised fine-tuning with full, LoRA, QLoRA, prefix-tuning and adapter methods.

    from lmstack.finetune import FinetuneConfig, finetune
    summary = finetune(FinetuneConfig(base="runs/pretrain", method="lora", steps=200))

Building blocks (each a module swap on an ordinary lmstack model, usable on its own):
``lora.add_lora / set_adapter / merge_lora / merge_and_unload``, ``quant.quantize_base`` (int8/int4/NF4),
``prefix.add_prefix``, ``adapter.add_adapters``; SFT data in ``sft`` (formats, chat rendering,
assistant-only labels, length-grouped batches, the default stdlib SFT data).
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that importing lmstack.finetune.cli (``lmstack --help``) does not import torch.
_LAZY = {"AdapterConfig": "adapter", "add_adapters": "adapter",
         **{n: "lora" for n in ("LoraConfig", "add_lora", "merge_and_unload", "merge_lora", "set_adapter",
                                 "unmerge_lora")},
         "PrefixConfig": "prefix", "add_prefix": "prefix", "QuantLinear": "quant", "quantize_base": "quant",
         **{n: "run" for n in ("FinetuneConfig", "apply_method", "finetune", "load_adapter", "load_base",
                                "merge_run", "save_adapter", "speedrun_sft")}}

__all__ = ["AdapterConfig", "FinetuneConfig", "LoraConfig", "PrefixConfig", "QuantLinear", "add_adapters", "add_lora",
           "add_prefix", "apply_method", "finetune", "load_adapter", "load_base", "merge_and_unload", "merge_lora",
           "merge_run", "quantize_base", "save_adapter", "set_adapter", "speedrun_sft", "unmerge_lora"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lmstack.finetune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.finetune' has no attribute {name!r}")
