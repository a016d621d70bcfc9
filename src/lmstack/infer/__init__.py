"""lmstack.infer: the one generation engine (greedy, sampling, beam search, KV cache, batching, streaming,
speculative decoding) that chat, the judges and the evaluation harness call (serving, RAG and RL rollouts,
when they land, are meant to call it too).

    from lmstack.infer import generate, GenerationConfig
    out = generate(model, input_ids, GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9, seed=0))

The engine speaks token ids; :mod:`lmstack.infer.text` adds text in/out and UTF-8-safe streaming.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that importing lmstack.infer.cli (``lmstack --help``) does not import torch.
_LAZY = {"GenerationConfig": "config", "GenerationResult": "engine", "generate": "engine",
         "generate_result": "engine", "stream": "engine", "generate_text": "text", "stream_text": "text",
         "compile_constraint": "constrain", "validate_json": "structured", "generate_json": "structured"}

__all__ = ["GenerationConfig", "GenerationResult", "generate", "generate_result", "stream", "generate_text",
           "stream_text", "compile_constraint", "validate_json", "generate_json"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lmstack.infer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.infer' has no attribute {name!r}")
