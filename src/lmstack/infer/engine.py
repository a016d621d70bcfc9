"""The engine: ``generate(model, input_ids, config) -> ids``. Token ids in, token ids out.

    from lmstack.infer import generate, GenerationConfig
    out = generate(model, prompt_ids, GenerationConfig(max_new_tokens=32))          # (B, T + new)
    res = generate_result(model, [[5, 6, 7], [8]], cfg)                              # ragged prompts
    for chunk in stream(model, ids, cfg): ...                                        # new ids per step

Flow: a :class:`~lmstack.infer.session.Session` validates and left-pads the prompts and holds the
buffers -> prefill the KV cache with the whole prompt (one forward) -> one token per step (processors
-> argmax or a draw) -> each row stops on its own (EOS / stop ids, stop strings, ``max_new_tokens``,
the context window); finished rows are filled with the pad id while the others go on.

Three loops over a session, each returning its :class:`GenerationResult`: :func:`decode_steps`
(greedy / sampling, here), :func:`lmstack.infer.beam.beam_search` and
:func:`lmstack.infer.speculative.speculative_steps`. The step loops are generators that yield the new
ids per step (for streaming) and return the result. Sequences that join and leave a running batch
between steps (continuous batching) are :class:`lmstack.infer.batch.Batch`.

The per-step work outside the model is kept to a handful of tensor ops (no processors for plain
greedy decoding, one host sync per step for "all rows finished?").
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.infer.beam import beam_search
from lmstack.infer.config import GenerationConfig
from lmstack.infer.session import GenerationResult, Prompt, Session, as_batch, eval_mode
from lmstack.infer.speculative import speculative_steps

__all__ = ["GenerationResult", "Session", "as_batch", "decode_steps", "generate", "generate_result", "stream"]

Steps = Generator["list[list[int]] | None", None, GenerationResult]


def decode_steps(s: Session, want_lists: bool = False) -> Steps:
    """The plain loop, greedy or sampling, one token per step. Yields after each step (the new ids per
    row when ``want_lists``); returns the result."""
    if s.max_new == 0:
        return s.result()
    logits = s.prefill()
    t0 = time.perf_counter()
    for step in range(s.max_new):
        lists = s.append(*s.choose(logits), want_lists=want_lists)
        yield lists
        if step == s.max_new - 1 or s.all_done():
            break
        logits = s.runner.step(s.seq, s.cur)
    s.stats["decode_s"] = time.perf_counter() - t0
    return s.result()


# ---------------------------------------------------------------------------------------------------- entry points


def _steps(session: Session, want_lists: bool) -> Steps:
    """The step loop for this session's config (beam search has none: it is not streamed)."""
    if session.speculative:
        return speculative_steps(session, want_lists)
    return decode_steps(session, want_lists)


def _drain(steps: Steps) -> GenerationResult:
    """Run a step loop to its end; its return value is the result."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def generate_result(model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
                    attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
                    draft_model: nn.Module | None = None) -> GenerationResult:
    """Generate and return everything: sequences, per-row lengths and finish reasons, log-probs, beam
    scores, timings and speculative-decoding statistics. See :func:`generate` for the arguments."""
    with torch.inference_mode(), eval_mode(model, draft_model):
        session = Session(model, input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer,
                          draft_model=draft_model)
        t0 = time.perf_counter()
        result = beam_search(session) if session.config.is_beam else _drain(_steps(session, False))
        result.stats["total_s"] = time.perf_counter() - t0
        return result


def generate(model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
             draft_model: nn.Module | None = None) -> torch.Tensor:
    """Token ids (B, T + new): the (left-padded) prompts followed by the generated ids.

    ``input_ids``: a LongTensor (B, T) (with ``attention_mask``, 0 = left padding) or ragged lists of
    ids. ``config``: a :class:`GenerationConfig` (greedy, 64 tokens by default). ``tokenizer`` is
    needed for ``stop_strings`` only. ``draft_model`` turns on speculative decoding (as does
    ``config.prompt_lookup_num_tokens``). Rows that stop early are padded with the pad id; an
    encoder-decoder model returns the decoder ids (start token first).
    """
    return generate_result(model, input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer,
                           draft_model=draft_model).sequences


def stream(model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
           attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
           draft_model: nn.Module | None = None) -> Iterator[list[list[int]]]:
    """Yield the new ids of each row after every step (``[]`` for finished rows; several ids per step with
    speculative decoding). Beam search has no meaningful partial output and is refused. Bad input
    raises here, at the call, not at the first ``next``."""
    cfg = config or GenerationConfig()
    if cfg.is_beam:
        raise ConfigError("streaming needs num_beams=1 (beam search only knows its best sequence at the end)")
    with torch.inference_mode():
        session = Session(model, input_ids, cfg, attention_mask=attention_mask, tokenizer=tokenizer,
                          draft_model=draft_model)
    return _stream(session)


@torch.inference_mode()   # the decorator (not a with-block) re-enters the mode around each step of the generator
def _stream(session: Session) -> Iterator[list[list[int]]]:
    with eval_mode(session.model, session.draft_model):
        yield from _steps(session, True)
