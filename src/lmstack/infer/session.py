"""The state of one ``generate`` call: token buffers, per-row stop state, the runner (model + KV cache).

A :class:`Session` is what every decoding loop works on, and all it does is hold state and the few
operations on it the loops share: ``prefill`` (logits of the first new token), ``choose`` (next token
per row, from raw logits), ``append`` (write one token per row and update who has stopped) and
``result``. The loops themselves live elsewhere and each *returns* its :class:`GenerationResult`:
greedy / sampling in :func:`lmstack.infer.engine.decode_steps`, beam search in
:func:`lmstack.infer.beam.beam_search`, speculative decoding in
:func:`lmstack.infer.speculative.speculative_steps`.

The rules that a running batch with sequences coming and going (:mod:`lmstack.infer.batch`) shares with
it are plain functions here: prompt validation (:func:`as_batch`, :func:`check_token_ids`), the room
the context leaves (:func:`room_for`), the stop/pad ids (:func:`stop_and_pad_ids`), seeded generators
and the stop-string test (:func:`stop_string_hit`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


# ---------------------------------------------------------------------------------------------------- shared rules


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


def check_token_ids(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    """Every real prompt id must be inside the vocabulary."""
    lo, hi = int(ids[mask].min()), int(ids[mask].max())
    if lo < 0 or hi >= vocab:
        raise LmstackError(f"token id {hi if hi >= vocab else lo} is outside the model's vocabulary of {vocab}")


def stop_and_pad_ids(cfg: GenerationConfig, mcfg: Any) -> tuple[list[int], int]:
    """The stop ids and the pad id (config's, else the model's pad, else the first stop id, else 0), checked."""
    eos = list(cfg.eos_token_id or [])
    pad = (cfg.pad_token_id if cfg.pad_token_id is not None else
           mcfg.pad_token_id if mcfg.pad_token_id is not None else eos[0] if eos else 0)
    if any(i >= mcfg.vocab_size for i in eos) or pad >= mcfg.vocab_size:
        raise ConfigError(f"eos_token_id / pad_token_id must be < the vocabulary size {mcfg.vocab_size}")
    return eos, pad


def room_for(real_len: int, ctx: int, wanted: int, window: int | None = None) -> int:
    """How many new tokens fit after a prompt of ``real_len`` tokens (a sliding window never fills);
    a prompt that leaves no room when ``wanted`` > 0 tokens are asked for is an error."""
    limit = window or ctx
    if real_len > limit:
        what = "sliding window" if window else "context window"
        raise LmstackError(f"the prompt has {real_len} tokens, more than the model's {what} of {limit}; shorten it")
    room = 10 ** 9 if window else ctx - real_len
    if room == 0 and wanted > 0:
        raise LmstackError(f"the prompt has {real_len} tokens and fills the model's context window of "
                           f"{ctx}: no room for new tokens; shorten it")
    return room


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator (same seed, same draws, untouched global RNG), or None for the global one."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stop_string_hit(tail: bytes, new: bytes, stops: Sequence[bytes]) -> tuple[bool, bytes]:
    """Does ``tail + new`` contain a stop string? Returns (hit, the tail to keep for the next token)."""
    text = tail + new
    longest = max(len(s) for s in stops)
    return any(s in text for s in stops), text[-(longest + 64):]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_generation_model(model: nn.Module) -> Any:
    """The model's config, if it is a model generate can drive."""
    mcfg = getattr(model, "config", None)
    if mcfg is None or getattr(mcfg, "arch", None) not in ("decoder", "encoder-decoder"):
        raise LmstackError("generate needs an lmstack decoder or encoder-decoder model "
                           "(lmstack.model.build_model / load / hf.load)")
    return mcfg


class eval_mode:
    """Switch the model(s) to eval for the call (no dropout), then restore their mode."""

    def __init__(self, *models: nn.Module | None):
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        # a model already in eval mode is left alone: eval()/train() walk every submodule, which costs about a
        # millisecond per decode step on a server's Batch (measured on an 8-layer model)
        self.switched = [m for m in self.models if m.training]
        for m in self.switched:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m in self.switched:
            m.train(True)


# ---------------------------------------------------------------------------------------------------- session


class Session:
    """Buffers, per-row stop state and runner of one ``generate`` call; the decoding loops work on it."""

    def __init__(self, model: nn.Module, input_ids: Prompt, config: GenerationConfig | None = None, *,
                 attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
                 draft_model: nn.Module | None = None):
        self.config = cfg = config or GenerationConfig()
        mcfg = check_generation_model(model)
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.seq2seq = mcfg.arch == "encoder-decoder"
        self.device = model_device(model)
        self.eos, self.pad = stop_and_pad_ids(cfg, mcfg)
        ids, mask = as_batch(input_ids, attention_mask, self.pad, self.device)
        vocab = mcfg.vocab_size
        check_token_ids(ids, mask, vocab)
        ids = ids.masked_fill(~mask, self.pad)             # whatever sat under the padding, the model sees pad ids
        if cfg.stop_strings and tokenizer is None:
            raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to generate (or use generate_text)")
        if cfg.sliding_window and mcfg.pos == "learned":
            raise ConfigError("sliding_window needs a model with relative positions (RoPE or ALiBi); "
                              "this one has learned absolute positions")
        if cfg.sliding_window and (cfg.is_beam or self.speculative or not cfg.use_cache):
            raise ConfigError("sliding_window works with greedy and sampled decoding with the KV cache, "
                              "not with beam search, speculative decoding or use_cache=false")
        model_window = getattr(mcfg, "sliding_window", None)
        if cfg.attention_sinks and model_window is not None and cfg.sliding_window > model_window:
            raise ConfigError(f"generation config field 'sliding_window': {cfg.sliding_window} exceeds the model's "
                              f"own sliding_window={model_window}, which would hide the attention sinks; set "
                              f"sliding_window <= {model_window}")
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
            room = room_for(real_len, ctx, cfg.max_new_tokens, cfg.sliding_window)
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
        self.eos_t = torch.tensor(self.eos, dtype=torch.long, device=self.device) if self.eos else None
        self.generator = make_generator(cfg.seed, self.device)
        if draft_model is not None and (cfg.json_schema is not None or cfg.regex is not None or
                                        cfg.grammar is not None):
            raise ConfigError("constrained decoding (json_schema / regex / grammar) does not combine with "
                              "speculative decoding: drop draft_model")
        self.processors = build_processors(cfg, self.prompt_len, self.pad_len, self.eos,
                                           min_keep=(len(self.eos) + 1) if cfg.is_beam else 1,
                                           tokenizer=tokenizer, vocab_size=vocab)
        self.want_logprobs = cfg.output_logprobs or cfg.top_logprobs > 0
        self.logprobs: list[torch.Tensor] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stop_bytes = [s.encode("utf-8") for s in cfg.stop_strings]
        self.tails = [b""] * self.batch
        self.stats: dict[str, Any] = {"prompt_tokens": int(mask.sum()), "batch": self.batch}
        # the compiled static step serves the plain loop only (beam search and speculative decoding move
        # and rewind cache slots with many-token forwards)
        compile = cfg.compile and not cfg.is_beam and not self.speculative
        self.runner = Runner(model, self.batch, width, cfg.use_cache, cfg.sliding_window, cfg.kv_cache_dtype,
                             compile=compile, sinks=cfg.attention_sinks)
        # nothing can stop a row before max_new_tokens: the per-step stop bookkeeping is skipped
        self.can_stop = self.eos_t is not None or bool(self.stop_bytes)

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

    def observe(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Log-probs (B, V) of the raw ``logits`` of the token about to be appended (recording the top-k
        alternatives), or None when the config asks for no log-probs. Pass them on to :meth:`append`."""
        if not self.want_logprobs:
            return None
        logp = logits.log_softmax(dim=-1)
        if self.config.top_logprobs:
            self.top.append(torch.topk(logp, min(self.config.top_logprobs, logits.shape[-1]), dim=-1))
        return logp

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token per row (B,) from raw logits (B, V): processors, then argmax or a draw; with the
        log-probs of :meth:`observe`."""
        logp = self.observe(logits)
        if self.processors:
            logits = apply_processors(self.processors, self.seq[:, :self.cur], logits)
        if self.config.do_sample:
            return sample(logits.softmax(dim=-1), self.generator), logp
        return logits.argmax(dim=-1), logp

    def append(self, tokens: torch.Tensor, logp: torch.Tensor | None = None,
               want_lists: bool = False) -> list[list[int]] | None:
        """Write one token per row (B,) at ``cur``; finished rows get the pad id. Updates the stop state.

        ``logp``: the :meth:`observe` log-probs these tokens were chosen under (when log-probs are wanted)."""
        if not self.can_stop:          # fast path: no row is ever finished, every row gains one token
            if logp is not None:
                self.logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))
            self.seq[:, self.cur] = tokens
            self.cur += 1
            self.gen_len += 1
            return [[t] for t in tokens.tolist()] if want_lists else None
        tokens = torch.where(self.finished, self.pad, tokens)
        if logp is not None:
            self.logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))
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
            self._check_stop_strings(lists)
        return lists

    def _check_stop_strings(self, lists: list[list[int]]) -> None:
        done = []
        for row, new in enumerate(lists):
            if not new:
                continue
            hit, self.tails[row] = stop_string_hit(self.tails[row], self.tokenizer.token_bytes(new[0]),
                                                   self.stop_bytes)
            if hit:
                done.append(row)
        if done:
            self.finished[torch.tensor(done, device=self.device)] = True

    def all_done(self) -> bool:
        return self.can_stop and bool(self.finished.all())

    def result(self, sequences: torch.Tensor | None = None, scores: torch.Tensor | None = None,
               gen_len: list[int] | None = None, finished: list[bool] | None = None) -> GenerationResult:
        """The result from the buffers (or from the given rows, e.g. beam search's best hypotheses)."""
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
        masks = [t for p in self.processors for t in getattr(p, "mask_s", ())]
        if masks:   # constrained decoding: the time of every row's mask, for the bench
            self.stats["constraint_mask_s"] = masks
        self.stats["context_capped"] = self.capped
        return GenerationResult(sequences, self.prompt_len, gen_len, reasons, lp, top, scores, self.stats)
