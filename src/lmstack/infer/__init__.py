"""lmstack.infer: the one generation engine (greedy, sampling, beam search, KV cache, batching, streaming,
speculative decoding) that chat, serving, RAG, judges and RL rollouts call.

    from lmstack.infer import generate, GenerationConfig
    out = generate(model, input_ids, GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9, seed=0))

The engine speaks token ids; :mod:`lmstack.infer.text` adds text in/out and UTF-8-safe streaming.
"""

from __future__ import annotations

from lmstack.infer.config import GenerationConfig
from lmstack.infer.engine import GenerationResult, generate, generate_result, stream

__all__ = ["GenerationConfig", "GenerationResult", "generate", "generate_result", "stream", "generate_text",
           "stream_text"]


def __getattr__(name: str):
    if name in ("generate_text", "stream_text"):
        from lmstack.infer import text
        return getattr(text, name)
    raise AttributeError(f"module 'lmstack.infer' has no attribute {name!r}")
