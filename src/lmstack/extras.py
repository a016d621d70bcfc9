"""Optional dependencies: one place that imports them and names the extra to install when one is missing.

The core (tokenizer, model, train, infer, the speedrun's corpus and tokenizer) needs only the required
dependencies of ``pyproject.toml``. The rest are extras::

    pip install "lmstack[data]"   # pyarrow (Parquet), trafilatura (HTML main text), langid (language filter)
    pip install "lmstack[eval]"   # sacrebleu (BLEU/chrF), nltk (ROUGE stemming, METEOR), rapidfuzz (fast edit distance)
    pip install "lmstack[compress]"   # gguf (GGUF export of quantized weights)
    pip install "lmstack[rag]"    # faiss-cpu (HNSW / IVF-PQ indexes), pypdf (PDF documents)
    pip install "lmstack[structured]"   # llguidance (constrained decoding), jsonschema (validation, prompt suites)
    pip install "lmstack[serve]"  # fastapi, uvicorn (the OpenAI-compatible server, lmstack serve)
    pip install "lmstack[monitor]"   # psycopg (a PostgreSQL interaction log), scipy (exact KS p-values)
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lmstack.errors import LmstackError

# the extra that provides each optional top-level package (its pip name where that differs)
EXTRAS = {"pyarrow": "data", "fastapi": "serve", "uvicorn": "serve", "trafilatura": "data", "langid": "data",
          "sacrebleu": "eval", "nltk": "eval", "rapidfuzz": "eval", "gguf": "compress",
          "faiss": "rag", "pypdf": "rag", "llguidance": "structured", "jsonschema": "structured",
          "xgrammar": "xgrammar", "psycopg": "monitor", "scipy": "monitor"}


class MissingExtraError(LmstackError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"pyarrow.parquet"``) or raise :class:`MissingExtraError` naming its extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:  # a broken install of it, not a missing one: a bug
            raise
        extra = EXTRAS.get(top)
        hint = f'pip install "lmstack[{extra}]"' if extra else f"pip install {top}"
        raise MissingExtraError(f"{purpose} needs the package {top!r}, which is not installed: {hint}") from None


def available(module: str) -> bool:
    """Whether an optional package can be imported (for code with a fallback)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None
