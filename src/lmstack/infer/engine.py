"""The engine: ``generate(model, input_ids, config) -> ids``. Token ids in, token ids out.

    from lmstack.infer import generate, GenerationConfig
    out = generate(model, prompt_ids, GenerationConfig(max_new_tokens=32))          # (B, T + new)
    res = generate_result(model, [[5, 6, 7], [8]], cfg)                              # ragged prompts
    for chunk in stream(model, ids, cfg): ...                                        # new ids per step

Flow: validate and left-pad the prompts -> prefill the KV cache with the whole prompt (one forward)
-> one token per step (processors -> argmax or a draw) -> each row stops on its own (EOS / stop ids,
stop strings, ``max_new_tokens``, the context window); finished rows are filled with the pad id
while the others go on. Beam search (:mod:`lmstack.infer.beam`) and speculative decoding
(:mod:`lmstack.infer.speculative`) are other loops over the same :class:`Session`.

The per-step work outside the model is kept to a handful of tensor ops (no processors for plain
greedy decoding, one host sync per step for "all rows finished?").
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer.config import GenerationConfig
from lmstack.infer.runner import Runner
from lmstack.infer.sampling import apply_processors, build_processors, sample

Prompt = torch.Tensor | Sequence[Sequence[int]]


@dataclass
class GenerationResult:
    """What one call produced. Rows are prompts (times ``num_return_sequences``, grouped by prompt)."""

    sequences: torch.Tensor                   # (B*n, T + new): left-padded prompt, then generated ids (pad after a stop)
    prompt_len: int                           # T, the padded prompt width (decoder start token for seq2seq)
    num_generated: list[int]                  # new tokens per row, a final stop token included
    finish_reasons: list[str]                 # "stop" (EOS, stop id or stop string) or "length"
    logprobs: torch.Tensor | None = None      # (B*n, new) log p(chosen token) under the raw model distribution
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None   # values, ids (B*n, new, k)
    scores: torch.Tensor | None = None        # beam search: (B*n,) length-normalised sequence scores
    stats: dict[str, Any] = field(default_factory=dict)   # timings, tokens, speculative acceptance

    def new_tokens(self, row: int) -> list[int]:
        """The ids generated for ``row``, without padding."""
        start = self.prompt_len
        return self.sequences[row, start:start + self.num_generated[row]].tolist()


# ---------------------------------------------------------------------------------------------------- inputs


def as_batch(input_ids: Prompt, attention_mask: torch.Tensor | None, pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, T) and mask (B, T) from a tensor (+ mask) or ragged lists of ids; validated."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise LmstackError(f"input_ids must be (batch, length) token ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise LmstackError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != ids.shape:
            raise LmstackError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    else:
        items = list(input_ids)
        if not items:
            raise LmstackError("no prompts given")
        if all(isinstance(r, int) for r in items):          # a flat list of ids: one prompt
            items = [items]
        try:
            rows = [[int(t) for t in r] for r in items]
        except (TypeError, ValueError):
            raise LmstackError("input_ids must be a tensor or lists of integer token ids") from None
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = True
    if ids.shape[0] == 0:
        raise LmstackError("no prompts given")
    if ids.shape[1] == 0 or not bool(mask.any(dim=1).all()):
        raise LmstackError("empty prompt: every prompt needs at least one token (e.g. the BOS or EOS id)")
    if ids.shape[1] > 1 and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise LmstackError("attention_mask: padding must be on the left for generation")
    return ids.to(device=device, dtype=torch.long), mask.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------- session


class Session:
    """The state of one ``generate`` call: buffers, stop state, runner; shared by all decoding loops."""

    def __init__(self, model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
                 attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
                 draft_model: nn.Module | None = None):
        self.config = cfg = config or GenerationConfig()
        mcfg = getattr(model, "config", None)
        if mcfg is None or getattr(mcfg, "arch", None) not in ("decoder", "encoder-decoder"):
            raise LmstackError("generate needs an lmstack decoder or encoder-decoder model "
                               "(lmstack.model.build_model / load / hf.load)")
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.seq2seq = mcfg.arch == "encoder-decoder"
        self.device = _model_device(model)
        self.eos = list(cfg.eos_token_id or [])
        self.pad = (cfg.pad_token_id if cfg.pad_token_id is not None else
                    mcfg.pad_token_id if mcfg.pad_token_id is not None else self.eos[0] if self.eos else 0)
        ids, mask = as_batch(input_ids, attention_mask, self.pad, self.device)
        vocab = mcfg.vocab_size
        lo, hi = int(ids[mask].min()), int(ids[mask].max())
        if lo < 0 or hi >= vocab:
            raise LmstackError(f"token id {hi if hi >= vocab else lo} is outside the model's vocabulary of {vocab}")
        ids = ids.masked_fill(~mask, self.pad)             # whatever sat under the padding, the model sees pad ids
        if any(i >= vocab for i in self.eos) or self.pad >= vocab:
            raise ConfigError(f"eos_token_id / pad_token_id must be < the vocabulary size {vocab}")
        if cfg.stop_strings and tokenizer is None:
            raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to generate (or use generate_text)")
        if cfg.sliding_window and mcfg.pos == "learned":
            raise ConfigError("sliding_window needs a model with relative positions (RoPE or ALiBi); "
                              "this one has learned absolute positions")
        if cfg.sliding_window and (cfg.is_beam or self.speculative or not cfg.use_cache):
            raise ConfigError("sliding_window works with greedy and sampled decoding with the KV cache, "
                              "not with beam search, speculative decoding or use_cache=false")
        if draft_model is not None:
            if getattr(draft_model, "config", None) is None or draft_model.config.arch != "decoder":
                raise LmstackError("draft_model must be an lmstack decoder model")
            if draft_model.config.vocab_size != vocab:
                raise LmstackError(f"draft model vocabulary ({draft_model.config.vocab_size}) differs from the "
                                   f"target's ({vocab})")
            if self.seq2seq or cfg.is_beam:
                raise ConfigError("speculative decoding needs a decoder-only target and num_beams=1")

        # rows: each prompt repeated for its beams or its returned samples
        self.n_prompts = ids.shape[0]
        copies = cfg.num_beams if cfg.is_beam else cfg.num_return_sequences
        if copies > 1:
            ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        real_len = int(mask.sum(1).max())
        ctx = mcfg.max_seq_len
        if self.seq2seq:
            self.src, self.src_mask = ids, (mask if not bool(mask.all()) else None)
            if ids.shape[1] > ctx:
                raise LmstackError(f"the source has {ids.shape[1]} tokens, more than the model's context of {ctx}")
            start = cfg.decoder_start_token_id
            if start is None:
                start = self.eos[0] if self.eos else 0
            ids = torch.full((ids.shape[0], 1), start, dtype=torch.long, device=self.device)
            mask = torch.ones_like(ids, dtype=torch.bool)
            room = ctx - 1
        else:
            self.src = self.src_mask = None
            limit = cfg.sliding_window or ctx
            if real_len > limit:
                what = "sliding window" if cfg.sliding_window else "context window"
                raise LmstackError(f"the prompt has {real_len} tokens, more than the model's {what} of {limit}; "
                                   f"shorten it")
            room = 10 ** 9 if cfg.sliding_window else ctx - real_len
            if room == 0 and cfg.max_new_tokens > 0:
                raise LmstackError(f"the prompt has {real_len} tokens and fills the model's context window of "
                                   f"{ctx}: no room for new tokens; shorten it")
        self.max_new = min(cfg.max_new_tokens, room)
        self.capped = self.max_new < cfg.max_new_tokens            # the context window, not max_new_tokens, ends it
        self.batch, self.prompt_len = ids.shape
        width = self.prompt_len + self.max_new
        self.seq = torch.full((self.batch, width), self.pad, dtype=torch.long, device=self.device)
        self.seq[:, :self.prompt_len] = ids
        self.prompt_mask = mask
        self.cur = self.prompt_len
        self.pad_len = (~mask).sum(1) if not bool(mask.all()) else None
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        self.gen_len = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.reasons = ["length"] * self.batch
        self.eos_t = torch.tensor(self.eos, dtype=torch.long, device=self.device) if self.eos else None
        self.generator = None
        if cfg.seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(cfg.seed)
        self.processors = build_processors(cfg, self.prompt_len, self.pad_len, self.eos,
                                           min_keep=(len(self.eos) + 1) if cfg.is_beam else 1)
        self.want_logprobs = cfg.output_logprobs or cfg.top_logprobs > 0
        self.logprobs: list[torch.Tensor] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stop_bytes = [s.encode("utf-8") for s in cfg.stop_strings]
        self.tails = [b""] * self.batch
        self.stats: dict[str, Any] = {"prompt_tokens": int(mask.sum()), "batch": self.batch}
        self.runner = Runner(model, self.batch, width, cfg.use_cache, cfg.sliding_window)

    @property
    def speculative(self) -> bool:
        return self.draft_model is not None or self.config.prompt_lookup_num_tokens is not None

    # ----- the pieces every loop uses

    def prefill(self) -> torch.Tensor:
        """Run the prompt; logits (B, V) of the first new token, fp32."""
        t0 = time.perf_counter()
        logits = self.runner.prefill(self.seq, self.cur, self.prompt_mask, self.src, self.src_mask)
        out = logits[:, -1].float()
        self.stats["prefill_s"] = time.perf_counter() - t0
        return out

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row (B,) from raw logits (B, V): processors, then argmax or a draw."""
        if self.want_logprobs:
            self._record_logprobs(logits)
        if self.processors:
            logits = apply_processors(self.processors, self.seq[:, :self.cur], logits)
        if self.config.do_sample:
            return sample(logits.softmax(dim=-1), self.generator)
        return logits.argmax(dim=-1)

    def _record_logprobs(self, logits: torch.Tensor) -> None:
        self._pending_lp = logits.log_softmax(dim=-1)
        if self.config.top_logprobs:
            self.top.append(torch.topk(self._pending_lp, min(self.config.top_logprobs, logits.shape[-1]), dim=-1))

    def append(self, tokens: torch.Tensor, want_lists: bool = False) -> list[list[int]] | None:
        """Write one token per row (B,) at ``cur``; finished rows get the pad id. Updates the stop state."""
        tokens = torch.where(self.finished, self.pad, tokens)
        if self.want_logprobs:
            self.logprobs.append(self._pending_lp.gather(1, tokens[:, None]).squeeze(1))
        self.seq[:, self.cur] = tokens
        self.cur += 1
        active = ~self.finished
        self.gen_len += active.long()
        lists = None
        if want_lists or self.stop_bytes:
            toks = tokens.tolist()
            act = active.tolist()
            lists = [[t] if a else [] for t, a in zip(toks, act)]
        if self.eos_t is not None:
            hit = torch.isin(tokens, self.eos_t) & active
            self.finished |= hit
        if self.stop_bytes:
            self._check_stop_strings(lists, active)
        return lists

    def _check_stop_strings(self, lists: list[list[int]], active: torch.Tensor) -> None:
        longest = max(len(s) for s in self.stop_bytes)
        done = []
        for row, new in enumerate(lists):
            if not new:
                continue
            tail = self.tails[row] + self.tokenizer.token_bytes(new[0])
            if any(s in tail for s in self.stop_bytes):
                done.append(row)
            self.tails[row] = tail[-(longest + 64):]
        if done:
            self.finished[torch.tensor(done, device=self.device)] = True

    def all_done(self) -> bool:
        return bool(self.finished.all())

    # ----- the plain loop: greedy or sampling, one token per step

    def steps(self, want_lists: bool = False) -> Iterator[list[list[int]] | None]:
        """Decode; yield after each step (the new ids per row when ``want_lists``)."""
        if self.max_new == 0:
            return
        logits = self.prefill()
        t0 = time.perf_counter()
        for step in range(self.max_new):
            lists = self.append(self.choose(logits), want_lists)
            yield lists
            if step == self.max_new - 1 or self.all_done():
                break
            logits = self.runner.forward(self.seq, self.cur, 1)[:, -1].float()
        self.stats["decode_s"] = time.perf_counter() - t0

    def result(self, sequences: torch.Tensor | None = None, scores: torch.Tensor | None = None,
               gen_len: list[int] | None = None, finished: list[bool] | None = None) -> GenerationResult:
        if sequences is None:
            sequences = self.seq[:, :self.cur]
            gen_len = self.gen_len.tolist()
            finished = self.finished.tolist()
        reasons = ["stop" if f else "length" for f in finished]
        lp = torch.stack(self.logprobs, 1) if self.logprobs else None
        top = None
        if self.top:
            top = (torch.stack([t.values for t in self.top], 1), torch.stack([t.indices for t in self.top], 1))
        self.stats["new_tokens"] = int(sum(gen_len))
        self.stats["context_capped"] = self.capped
        return GenerationResult(sequences, self.prompt_len, gen_len, reasons, lp, top, scores, self.stats)


# ---------------------------------------------------------------------------------------------------- entry points


class _eval_mode:
    """Switch the model(s) to eval for the call (no dropout), then restore their mode."""

    def __init__(self, *models: nn.Module | None):
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def _loop(session: Session, want_lists: bool) -> Iterator[list[list[int]] | None]:
    if session.config.is_beam:
        from lmstack.infer.beam import beam_search

        session.beam = beam_search(session)
        return iter(())
    if session.speculative:
        from lmstack.infer.speculative import speculative_steps

        return speculative_steps(session, want_lists)
    return session.steps(want_lists)


def generate_result(model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
                    attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
                    draft_model: nn.Module | None = None) -> GenerationResult:
    """Generate and return everything: sequences, per-row lengths and finish reasons, log-probs, beam
    scores, timings and speculative-decoding statistics. See :func:`generate` for the arguments."""
    with torch.inference_mode(), _eval_mode(model, draft_model):
        session = Session(model, input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer,
                          draft_model=draft_model)
        t0 = time.perf_counter()
        for _ in _loop(session, False):
            pass
        session.stats["total_s"] = time.perf_counter() - t0
        if session.config.is_beam:
            return session.result(*session.beam)
        return session.result()


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
    with _eval_mode(session.model, session.draft_model):
        yield from _loop(session, True)
