"""Log-likelihoods under a decoder: the one forward-pass helper behind perplexity, bits-per-byte,
GPTScore and multiple-choice benchmarks.

Sequences are right-padded into a batch without an attention mask: with causal attention a real token
never sees the padding that follows it, so its logits are exactly those of the unpadded sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError


def model_context(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "max_seq_len", 1024))


@dataclass
class Scored:
    """Log-likelihood of the scored tail of one sequence."""

    logprob: float          # sum of log p(token | prefix) over the scored tokens (nats)
    n_tokens: int
    greedy: bool            # every scored token is the argmax (lm-evaluation-harness ``is_greedy``)
    token_logprobs: list[float]


@torch.no_grad()
def score_tails(model: nn.Module, sequences: Sequence[Sequence[int]], n_scored: Sequence[int],
                batch_size: int = 8, keep_tokens: bool = False) -> list[Scored]:
    """For each id sequence, the log-likelihood of its last ``n_scored`` tokens given everything before.

    Every sequence must fit the model's context and have at least ``n_scored + 1`` ids (the first id
    is context only). Batches are formed from sequences of similar length to waste little padding.
    """
    ctx = model_context(model)
    for i, (seq, k) in enumerate(zip(sequences, n_scored)):
        if len(seq) > ctx + 1:  # the model sees seq[:-1]; the last token is only a target
            raise ConfigError(f"sequence {i}: {len(seq)} tokens exceed the model context ({ctx}) + 1")
        if not 0 < k < len(seq):
            raise ConfigError(f"sequence {i}: cannot score {k} of {len(seq)} tokens (the first is context only)")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[Scored | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = len(sequences[idx[0]])
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            batch = batch.to(device)
            logits = model(batch[:, :-1])                                       # (B, T-1, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                n, k = len(sequences[i]), n_scored[i]
                targets = batch[r, n - k:n]                                     # (k,)
                rows = logp[r, n - k - 1:n - 1]                                 # (k, V): predictions of those
                lp = rows.gather(-1, targets[:, None])[:, 0]
                greedy = bool((rows.argmax(-1) == targets).all())
                out[i] = Scored(float(lp.sum()), k, greedy, lp.tolist() if keep_tokens else [])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def bos_prefix(tokenizer: Any, add_bos: bool | None = None) -> list[int]:
    """The ids put before every scored text: ``[bos]`` or ``[]``. The one BOS rule of perplexity and
    multiple choice, as lm-evaluation-harness >= 0.4.9.2 applies it: ``add_bos=None`` follows the tokenizer's
    own default (``tokenizer.add_bos``: a Hugging Face post-processor / ``add_bos_token`` that adds BOS;
    False for lmstack's BPE, whose training data has no BOS); True/False override it."""
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos", False))
    if not add_bos:
        return []
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        raise ConfigError("add_bos: true, but the tokenizer has no BOS token; set add_bos = false")
    return [bos]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of a context and its continuation, the way lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the pair is encoded as one string and the
    continuation is what follows the context's own encoding, so merges across the boundary are honoured.
    """
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[:len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]


def loglikelihoods(model: nn.Module, tokenizer: Any, contexts: Sequence[str], continuations: Sequence[str],
                   batch_size: int = 8, add_bos: bool | None = None) -> list[Scored]:
    """log p(continuation | context) for each pair, the context after :func:`bos_prefix` (lm-eval's rule);
    an empty context without BOS is conditioned on BOS, else EOS (lm-eval's prefix token). The sequence is
    cut from the left to fit the model (the last token is a target only, so context + 1 tokens fit)."""
    ctx_len = model_context(model)
    prefix = bos_prefix(tokenizer, add_bos)
    start = getattr(tokenizer, "bos_id", None)
    start = start if start is not None else getattr(tokenizer, "eos_id", None)
    seqs, ks = [], []
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        c_ids, x_ids = encode_pair(tokenizer, c, x)
        if not x_ids:
            raise ConfigError(f"item {i}: the continuation {x!r} encodes to no tokens")
        c_ids = prefix + c_ids
        if not c_ids:
            if start is None:
                raise ConfigError(f"item {i}: empty context and the tokenizer has no BOS or EOS token to "
                                  f"condition on")
            c_ids = [start]
        seq = (c_ids + x_ids)[-(ctx_len + 1):]
        if len(x_ids) >= len(seq):
            raise ConfigError(f"item {i}: the continuation alone ({len(x_ids)} tokens) fills the model context")
        seqs.append(seq)
        ks.append(len(x_ids))
    return score_tails(model, seqs, ks, batch_size)


@dataclass
class TextNLL:
    nll: float              # nats over the scored tokens
    n_tokens: int
    n_bytes: int            # UTF-8 bytes those tokens stand for

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")


def token_bytes_len(tokenizer: Any, ids: Sequence[int]) -> int:
    fn = getattr(tokenizer, "token_bytes", None)
    if fn is None:
        return len(tokenizer.decode(list(ids)).encode("utf-8"))
    return sum(len(fn(i)) for i in ids)


def text_nll(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int | None = None,
             stride: int | None = None, add_bos: bool | None = None, batch_size: int = 8) -> list[TextNLL]:
    """Negative log-likelihood of each text, long texts through a sliding window.

    Windows of ``max_length`` tokens (default the model context) advance by ``stride`` (default half
    of it); each token is scored once, in the first window that reaches it, with up to
    ``max_length - stride`` tokens of context from the window before (the Hugging Face perplexity recipe).
    When :func:`bos_prefix` gives BOS (``add_bos=None``: the tokenizer's rule), the first token of a text is
    scored too (given BOS); otherwise it is context only. Bytes are those of the scored tokens, for bits-per-byte.
    """
    max_length = max_length or model_context(model)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise ConfigError(f"perplexity option 'stride' must be in 1..max_length ({max_length}), got {stride}")
    if max_length > model_context(model):
        raise ConfigError(f"perplexity option 'max_length' {max_length} exceeds the model context "
                          f"{model_context(model)}")
    prefix = bos_prefix(tokenizer, add_bos)
    windows, scored, owner = [], [], []
    byte_counts = []
    for t, text in enumerate(texts):
        ids = prefix + list(tokenizer.encode(text))
        byte_counts.append(token_bytes_len(tokenizer, ids[1:]))
        prev_end = 1  # ids[0] is context only
        begin = 0
        while prev_end < len(ids):
            end = min(begin + max_length, len(ids))
            windows.append(ids[begin:end])
            scored.append(end - prev_end)
            owner.append(t)
            prev_end = end
            begin += stride
    results = score_tails(model, windows, scored, batch_size) if windows else []
    out = [TextNLL(0.0, 0, b) for b in byte_counts]
    for t, r in zip(owner, results):
        out[t].nll -= r.logprob
        out[t].n_tokens += r.n_tokens
    return out
