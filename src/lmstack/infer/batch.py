"""A running batch that sequences join and leave between steps, each with its own generation config.

The building block of continuous batching (a server admits requests as slots free up)::

    batch = Batch(model, slots=8)
    a = batch.add([5, 6, 7], GenerationConfig(max_new_tokens=32))
    b = batch.add([9, 10], GenerationConfig(max_new_tokens=8, do_sample=True, seed=0, eos_token_id=2))
    while batch.running:
        for seq_id, token, finished in batch.step():       # one new token per running sequence
            ...
        # between steps: batch.add(...) new prompts, batch.retire(seq_id) finished (or unwanted) ones

Layout: one preallocated KV cache of ``slots`` rows and ``max_len`` slot columns; a sequence owns one
row (its *slot*) from :meth:`Batch.add` until :meth:`Batch.retire`. Occupied rows are kept at the front
(retiring a row moves the last occupied row into its place), so a step forwards only the occupied rows
through a view of the cache: one running request costs what it costs alone, whatever ``slots`` is. All rows share one cursor (the next
column written); a sequence's tokens are contiguous and *end* at the cursor, the columns before its
first token are marked as padding in the cache's mask, and the model derives each row's position ids
from that mask (index among the row's real tokens), so a sequence sees exactly what it would see alone.

- ``add`` runs the prompt alone (a one-row prefill, so its first token is bit-identical to running it
  alone) and copies its keys/values into the free row so they end at the cursor; a prompt longer than
  the cursor first moves every row right (:meth:`KVCache.pad_left`).
- ``step`` chooses one token per running sequence (its own processors, sampler and seeded generator),
  updates its stop state, then runs one forward of the occupied rows (rows with nothing to feed get a
  padding token that nothing attends to). When the cursor reaches ``max_len``, or the columns before the
  oldest running sequence are over half the cursor, those columns are dropped (:meth:`KVCache.shift`), so
  attention spans about the longest running sequence, not the history of the batch.
- ``retire`` frees the row for the next ``add`` (the last occupied row moves into it); an empty batch
  resets its cursor.

Chunked prefill (``prefill_chunk=N``): ``add`` only queues the prompt; each ``step`` first runs at most N prompt
tokens of the waiting prompts (into their own one-row caches), then the decode step of the running rows, so one
long prompt delays everyone's next token by a chunk, not by the whole prompt. Prompts that arrive together and
fit the budget whole are prefilled in one left-padded forward (a position attends only to its own prompt, as
alone). A prompt whose prefill is done joins the batch in that step and gets its first token in it.

Prefix caching (``prefix_cache_tokens=N``): the KV of finished prefills is kept (least recently used first out,
up to N cached positions) under a hash chain of their ``PREFIX_BLOCK``-token blocks, as vLLM's automatic prefix
caching keys them; a new prompt starting with the same blocks (a shared system prompt) copies those positions
and prefills only the rest. ``stats`` counts the hits and the prompt tokens not recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer.config import GenerationConfig
from lmstack.infer.sampling import Processor, apply_processors, build_processors, sample
from lmstack.infer.session import (
    as_batch,
    check_generation_model,
    check_token_ids,
    eval_mode,
    make_generator,
    model_device,
    room_for,
    stop_and_pad_ids,
    stop_string_hit,
)
from lmstack.model.cache import KVCache


@dataclass
class BatchSequence:
    """One sequence of a :class:`Batch`: its prompt, the ids generated so far and why it stopped."""

    seq_id: int
    prompt: list[int]
    config: GenerationConfig
    tokens: list[int] = field(default_factory=list)   # generated ids, a final stop id included
    finish_reason: str | None = None                  # None while running, then "stop" or "length"
    # with config.output_logprobs / top_logprobs: per generated id, log p under the raw model distribution
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)   # (id, log p), most likely first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Row:
    """Per-sequence decoding state (the engine's part of a slot)."""

    seq: BatchSequence
    slot: int
    start: int                          # cache column of the first prompt token
    ids: torch.Tensor                   # (1, prompt + max_new): what the processors see
    n: int                              # ids filled so far
    max_new: int
    eos: frozenset[int]
    processors: list[Processor]
    generator: torch.Generator | None
    stop_bytes: list[bytes]
    tail: bytes = b""
    prefill: _Prefill | None = None     # set while the prompt is still being prefilled (chunked prefill)


@dataclass
class _Prefill:
    """A prompt on its way in: its own one-row cache and how many of its ids that cache holds."""

    ids: torch.Tensor                   # (1, P)
    cache: KVCache                      # one row, P slots
    done: int = 0                       # prompt ids already run (a reused prefix counts)


PREFIX_BLOCK = 16   # prompt tokens per prefix-cache block: prefixes are reused in whole blocks


class Batch:
    """Sequences added to and retired from one running batch; see the module docstring for the contract."""

    def __init__(self, model: nn.Module, slots: int, max_len: int | None = None, *, tokenizer: Any = None,
                 prefill_chunk: int | None = None, prefix_cache_tokens: int = 0):
        mcfg = check_generation_model(model)
        if mcfg.arch != "decoder":
            raise ConfigError("Batch needs a decoder-only model (encoder-decoder models: use generate)")
        if slots < 1:
            raise ConfigError(f"Batch slots: must be >= 1, got {slots}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError(f"Batch prefill_chunk: must be >= 1 (or None: whole prompts), got {prefill_chunk}")
        if prefix_cache_tokens < 0:
            raise ConfigError(f"Batch prefix_cache_tokens: must be >= 0, got {prefix_cache_tokens}")
        self.prefill_chunk, self.prefix_cache_tokens = prefill_chunk, prefix_cache_tokens
        # block-chain hash -> (cache of a finished prefill, positions of it the hash covers); LRU order
        self._prefixes: OrderedDict[int, tuple[KVCache, int]] = OrderedDict()
        self.stats = {"prefix_hits": 0, "prefix_tokens_reused": 0, "prefill_tokens": 0}
        self.model, self.tokenizer = model, tokenizer
        self.mcfg = mcfg
        self.max_len = min(max_len or mcfg.max_seq_len, mcfg.max_seq_len)
        self.device = model_device(model)
        self.cache = KVCache.for_model(model, slots, self.max_len)
        self.logits = torch.zeros(slots, mcfg.vocab_size, device=self.device)   # next-token logits per row
        self.rows: list[_Row | None] = [None] * slots
        self.sequences: dict[int, BatchSequence] = {}
        self._next_id = 0

    # ----- the contract

    @property
    def slots(self) -> int:
        return len(self.rows)

    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def occupied(self) -> int:
        """Rows holding a sequence (always the first ``occupied`` rows)."""
        return self.slots - self.free_slots

    @property
    def running(self) -> list[int]:
        """Ids of the sequences still generating (a prompt still being prefilled included)."""
        return [r.seq.seq_id for r in self.rows if r is not None and not r.seq.finished]

    def add(self, prompt_ids: Sequence[int] | torch.Tensor, config: GenerationConfig | None = None) -> int:
        """Admit one prompt with its own config into a free slot; returns its sequence id.

        Runs the prompt (one forward; with ``prefill_chunk``, in chunks during the next steps); its first new
        token comes out of the next :meth:`step` (with chunks: the step that finishes its prefill). Raises
        :class:`LmstackError` when no slot is free (retire one first) or the prompt is invalid.
        """
        cfg = config or GenerationConfig()
        if cfg.is_beam or cfg.num_return_sequences > 1:
            raise ConfigError("Batch runs one sequence per prompt: num_beams and num_return_sequences must be 1")
        if cfg.prompt_lookup_num_tokens is not None or cfg.sliding_window or not cfg.use_cache:
            raise ConfigError("Batch supports greedy and sampled decoding with the KV cache: unset "
                              "prompt_lookup_num_tokens and sliding_window, keep use_cache=true")
        if cfg.stop_strings and self.tokenizer is None:
            raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to Batch")
        if None not in self.rows:
            raise LmstackError(f"the batch is full ({self.slots} slots): retire a sequence before adding another")
        eos, pad = stop_and_pad_ids(cfg, self.mcfg)
        ids, mask = as_batch(prompt_ids if isinstance(prompt_ids, torch.Tensor) else [list(prompt_ids)], None,
                             pad, self.device)
        if ids.shape[0] != 1:
            raise LmstackError(f"add takes one prompt, got {ids.shape[0]}")
        check_token_ids(ids, mask, self.mcfg.vocab_size)
        p = ids.shape[1]
        room = room_for(p, self.max_len, cfg.max_new_tokens)
        max_new = min(cfg.max_new_tokens, room)
        slot = self.rows.index(None)
        seq = BatchSequence(self._next_id, ids[0].tolist(), cfg)
        self._next_id += 1
        buf = torch.full((1, p + max_new), pad, dtype=torch.long, device=self.device)
        buf[:, :p] = ids
        row = _Row(seq, slot, 0, buf, p, max_new, frozenset(eos),
                   build_processors(cfg, p, None, eos, tokenizer=self.tokenizer, vocab_size=self.mcfg.vocab_size),
                   make_generator(cfg.seed, self.device),
                   [s.encode("utf-8") for s in cfg.stop_strings])
        self.rows[slot] = row
        self.sequences[seq.seq_id] = seq
        if max_new == 0:
            seq.finish_reason = "length"
            return seq.seq_id
        row.prefill = _Prefill(ids, KVCache.for_model(self.model, 1, p))
        self._reuse_prefix(row.prefill)
        if self.prefill_chunk is None:                                       # the whole prompt now
            with torch.inference_mode(), eval_mode(self.model):
                self._prefill(row, p)
        return seq.seq_id

    def step(self) -> list[tuple[int, int, bool]]:
        """One new token for every running sequence: ``[(seq_id, token, finished), ...]`` in slot order."""
        with torch.inference_mode(), eval_mode(self.model):
            budget = self.prefill_chunk or 0
            together = []     # prompts not started whose whole rest fits: one padded forward for all of them
            for r in [r for r in self.rows if r is not None and r.prefill is not None]:   # admission order
                if budget <= 0:
                    break
                rest = r.prefill.ids.shape[1] - r.prefill.done
                if r.prefill.done == 0 and rest <= budget:
                    together.append(r)
                    budget -= rest
                else:
                    budget -= self._prefill(r, budget)
            if len(together) == 1:
                self._prefill(together[0], budget + together[0].prefill.ids.shape[1])
            elif together:
                self._prefill_together(together)
            live = [r for r in self.rows if r is not None and not r.seq.finished and r.prefill is None]
            if not live:
                return []
            tokens = self._choose(live)
            self._record_logprobs(live, tokens)
            events = [(r.seq.seq_id, t, self._append(r, t)) for r, t in zip(live, tokens)]
            feed = [(r, t) for r, t in zip(live, tokens) if not r.seq.finished]
            if feed:
                self._forward(feed)
        return events

    def retire(self, seq_id: int) -> BatchSequence:
        """Take a sequence out (finished or not) and free its slot; returns it (prompt, tokens, reason)."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            raise LmstackError(f"no sequence {seq_id} in the batch (running: {self.running})")
        slot = next(i for i, r in enumerate(self.rows) if r is not None and r.seq is seq)
        last = self.occupied - 1
        if last != slot:                                   # keep the occupied rows at the front
            self.cache.move_row(last, slot)
            self.logits[slot] = self.logits[last]
            moved = self.rows[last]
            assert moved is not None
            moved.slot = slot
            self.rows[slot], self.rows[last] = moved, None
        else:
            self.rows[slot] = None
            self.cache.clear_row(slot)
        if self.occupied == 0:                             # nothing left: start the next sequence at column 0
            self.cache.reset()
        return seq

    # ----- prefill

    def _prefill(self, r: _Row, budget: int) -> int:
        """Run up to ``budget`` more prompt ids of ``r``; when the prompt is done, move its keys and values
        into the batch so they end at the cursor. Returns the ids run."""
        pf = r.prefill
        assert pf is not None
        p = pf.ids.shape[1]
        n = min(budget, p - pf.done)
        logits = self.model(pf.ids[:, pf.done:pf.done + n], kv_cache=pf.cache)[:, -1].float()   # (1, V)
        pf.done += n
        self.stats["prefill_tokens"] += n
        if pf.done < p:
            return n
        self._place(r, logits[0])
        return n

    def _prefill_together(self, rows: list[_Row]) -> None:
        """Prefill several whole prompts in one left-padded forward (prompts that arrive together, as a busy
        server's do, cost about one forward instead of one each); each row's keys and values then go to its own
        cache, as if it had run alone (each position attends only to its own prompt's positions)."""
        lens = [r.prefill.ids.shape[1] for r in rows]
        t = max(lens)
        ids = torch.zeros(len(rows), t, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), t, dtype=torch.bool, device=self.device)
        for i, (r, n) in enumerate(zip(rows, lens)):
            ids[i, t - n:] = r.prefill.ids[0]
            mask[i, t - n:] = True
        tmp = KVCache.for_model(self.model, len(rows), t)
        logits = self.model(ids, attention_mask=mask, kv_cache=tmp)[:, -1].float()              # (B, V)
        for i, (r, n) in enumerate(zip(rows, lens)):
            pf = r.prefill
            for dst, src in zip(pf.cache.tensors(), tmp.tensors()):
                dst[0, :, :n] = src[i, :, t - n:t]
            pf.cache.mask[:, :n] = True
            pf.cache.pos = pf.done = n
            self.stats["prefill_tokens"] += n
            self._place(r, logits[i])

    def _place(self, r: _Row, logits: torch.Tensor) -> None:
        """The prompt is in: move its keys and values into the batch so they end at the cursor."""
        pf = r.prefill
        assert pf is not None
        p = pf.ids.shape[1]
        if p > self.cache.pos:
            self._pad_left(p - self.cache.pos)
        r.start = self.cache.pos - p
        self.cache.write_row(r.slot, pf.cache, r.start)
        self.logits[r.slot] = logits
        r.prefill = None
        self._remember_prefix(pf)

    def _block_hashes(self, ids: list[int]) -> list[int]:
        """One hash per whole block of ``ids``, each chaining the blocks before it (a prefix's identity)."""
        out, h = [], 0
        for start in range(0, len(ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
            h = hash((h, tuple(ids[start:start + PREFIX_BLOCK])))
            out.append(h)
        return out

    def _reuse_prefix(self, pf: _Prefill) -> None:
        """Start ``pf`` from the longest cached block prefix of its prompt (the last id is always computed)."""
        if not self.prefix_cache_tokens:
            return
        ids = pf.ids[0].tolist()
        for k, h in reversed(list(enumerate(self._block_hashes(ids[:-1]), start=1))):
            hit = self._prefixes.get(h)
            if hit is None:
                continue
            src, _ = hit
            n = k * PREFIX_BLOCK
            for dst, buf in zip(pf.cache.tensors(), src.tensors()):
                dst[:, :, :n] = buf[:, :, :n]
            pf.cache.mask[:, :n] = True
            pf.cache.pos = pf.done = n
            self._prefixes.move_to_end(h)
            self.stats["prefix_hits"] += 1
            self.stats["prefix_tokens_reused"] += n
            return

    def _remember_prefix(self, pf: _Prefill) -> None:
        """Keep a finished prefill's cache under each of its block prefixes; evict least recently used ones."""
        if not self.prefix_cache_tokens:
            return
        hashes = self._block_hashes(pf.ids[0].tolist())
        for k, h in enumerate(hashes, start=1):
            self._prefixes[h] = (pf.cache, k * PREFIX_BLOCK)
            self._prefixes.move_to_end(h)
        while self.prefix_cache_held > self.prefix_cache_tokens:
            self._prefixes.popitem(last=False)

    @property
    def prefix_cache_held(self) -> int:
        """Positions held by the cached prefills (each counted once, however many block prefixes point at it)."""
        return sum(c.max_len for c in {id(c): c for c, _ in self._prefixes.values()}.values())

    # ----- the steps

    def _choose(self, live: list[_Row]) -> list[int]:
        """Next token per running row: one argmax over the rows for plain greedy, the row's own chain else."""
        greedy = self.logits[:self.occupied].argmax(dim=-1).tolist()
        out = []
        for r in live:
            if not r.processors and not r.seq.config.do_sample:
                out.append(greedy[r.slot])
                continue
            logits = self.logits[r.slot:r.slot + 1]
            if r.processors:
                logits = apply_processors(r.processors, r.ids[:, :r.n], logits)
            tok = sample(logits.softmax(dim=-1), r.generator) if r.seq.config.do_sample else logits.argmax(dim=-1)
            out.append(int(tok))
        return out

    def _record_logprobs(self, live: list[_Row], tokens: list[int]) -> None:
        """Log-probs of the chosen ids (and the top alternatives) under the raw model distribution, as
        ``generate`` reports them: before penalties, constraints and temperature."""
        for r, tok in zip(live, tokens):
            cfg = r.seq.config
            if not (cfg.output_logprobs or cfg.top_logprobs):
                continue
            logp = self.logits[r.slot].float().log_softmax(dim=-1)
            r.seq.logprobs.append(float(logp[tok]))
            if cfg.top_logprobs:
                values, ids = logp.topk(cfg.top_logprobs)
                r.seq.top_logprobs.append(list(zip(ids.tolist(), values.tolist())))

    def _append(self, r: _Row, token: int) -> bool:
        """Record the row's new token and its stop state; True when the sequence has finished."""
        r.ids[0, r.n] = token
        r.n += 1
        r.seq.tokens.append(token)
        if token in r.eos:
            r.seq.finish_reason = "stop"
        elif r.stop_bytes:
            hit, r.tail = stop_string_hit(r.tail, self.tokenizer.token_bytes(token), r.stop_bytes)
            if hit:
                r.seq.finish_reason = "stop"
        if r.seq.finish_reason is None and len(r.seq.tokens) >= r.max_new:
            r.seq.finish_reason = "length"
        return r.seq.finished

    def _forward(self, feed: list[tuple[_Row, int]]) -> None:
        """Feed each continuing row its new token at the cursor (one forward for all rows)."""
        unused = min(r.start for r, _ in feed)                   # columns no one running attends to
        if unused and (self.cache.pos == self.max_len or 2 * unused >= self.cache.pos):
            self._shift(unused)
        n = self.occupied
        tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        slots = torch.tensor([r.slot for r, _ in feed], device=self.device)
        tokens[slots, 0] = torch.tensor([t for _, t in feed], device=self.device)
        mask[slots, 0] = True
        view = self.cache.rows_view(n)                            # only the occupied rows, in place
        self.logits[:n] = self.model(tokens, attention_mask=mask, kv_cache=view)[:, -1].float()
        self.cache.sync_from(view)

    def _pad_left(self, n: int) -> None:
        self.cache.pad_left(n)
        for r in self.rows:
            if r is not None:
                r.start += n

    def _shift(self, n: int) -> None:
        self.cache.shift(n)
        for r in self.rows:
            if r is not None:
                r.start = max(r.start - n, 0)
