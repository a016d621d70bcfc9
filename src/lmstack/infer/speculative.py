"""Speculative decoding: a cheap proposer drafts k tokens, the target checks them all in one forward.

Proposers: a small draft model (same vocabulary), or prompt lookup (the tokens that followed the
latest earlier occurrence of the current n-gram; no model at all).

The accept rule (Leviathan et al. 2023; Chen et al. 2023) keeps the target's distribution exactly.
With p the target's and q the proposer's (processed) distributions at draft position i:

- accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order, stopping at the
  first rejection;
- at the first rejection (position n), draw the replacement from the residual
  norm(max(0, p_n - q_n)): the mass p has and q under-proposed. Summed over both branches,
  P(emit y) = q(y) min(1, p(y)/q(y)) + (1 - sum_z min(q(z), p(z))) * max(0, p(y) - q(y)) / Z = p(y);
- if all k are accepted, draw a bonus token from p_{k+1}, which the same forward already computed.

Greedy decoding accepts while the draft equals the target's argmax, then appends the argmax: the
output is the target's own greedy output. A deterministic proposer (prompt lookup) is q = one-hot.

Batches: rows accept different counts; every row keeps the batch minimum m of accepted tokens plus
one more (its own replacement, or its accepted draft token m + 1, or the bonus). Cutting a row's
accepted run short at a point chosen by the other rows' draws keeps the rule exact, and the KV
caches stay rectangular.

Cache bookkeeping (column j of ``seq`` = cache slot j): the target cache holds every emitted token
but the last; a round feeds [last, d_1..d_k] (k + 1 tokens) and rewinds to the accepted prefix. The
draft cache is rewound likewise and catches up (1 or 2 tokens) at the start of the next round.
"""

from __future__ import annotations

import time
from collections.abc import Generator

import torch

from lmstack.infer.runner import Runner
from lmstack.infer.sampling import apply_processors, sample
from lmstack.infer.session import GenerationResult, Session


def leading_accepts(ok: torch.Tensor) -> torch.Tensor:
    """Number of leading True per row of ok (B, k) -> (B,)."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def accept_greedy(target_ids: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_ids (B, k+1) argmax of the target at each draft position; draft (B, k).

    Returns (accepted count n (B,), next token (B,) = the target's choice at position n)."""
    n = leading_accepts(target_ids[:, :-1] == draft)
    return n, target_ids.gather(1, n[:, None]).squeeze(1)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact accept/resample rule (module docstring).

    p (B, k+1, V) target probabilities at each draft position and one past; q (B, k, V) the proposer's
    probabilities; draft (B, k) drawn from q. Returns (accepted count n (B,), next token (B,)), the
    next token drawn from the residual at position n, or from p_{k+1} when all k were accepted.
    """
    b, k = draft.shape
    p_d = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)                  # (B, k) p_i(x_i)
    q_d = q.gather(-1, draft[..., None]).squeeze(-1)                         # (B, k) q_i(x_i) > 0
    u = torch.rand(b, k, generator=generator, device=p.device)
    n = leading_accepts(u * q_d < p_d)                                        # u < p/q  <=>  accept w.p. min(1, p/q)
    vocab = p.shape[-1]
    p_n = p.gather(1, n[:, None, None].expand(b, 1, vocab)).squeeze(1)       # (B, V) p at position n
    q_n = q.gather(1, n.clamp(max=k - 1)[:, None, None].expand(b, 1, vocab)).squeeze(1)
    q_n = q_n * (n < k).to(q_n.dtype)[:, None]                               # all accepted: plain p_{k+1}
    resid = (p_n - q_n).clamp(min=0)
    # p == q leaves no residual mass; that branch has probability 0, guard the division anyway
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_n)
    return n, sample(resid / resid.sum(-1, keepdim=True), generator)


def prompt_lookup(row: torch.Tensor, k: int, max_ngram: int, start: int = 0) -> torch.Tensor:
    """Up to k tokens that followed the latest earlier occurrence of the row's final n-gram (longest n first).

    ``row`` (L,) holds the tokens so far; positions before ``start`` (padding) are ignored. Empty if none."""
    toks = row[start:]
    length = toks.shape[0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = toks[-n:]
        windows = toks[:-1].unfold(0, n, 1)                                   # (L - n, n): excludes the tail itself
        hits = (windows == tail).all(dim=-1).nonzero()
        if hits.numel():
            i = int(hits[-1]) + n                                             # first token after the match
            return toks[i:i + k]
    return toks[:0]


def speculative_steps(s: Session, want_lists: bool = False) -> Generator[list[list[int]] | None, None,
                                                                         GenerationResult]:
    """The speculative decoding loop over a session (greedy or sampling, any batch). Yields the ids each
    round added per row (when ``want_lists``); returns the result, acceptance statistics in ``stats``."""
    cfg = s.config
    lookup = s.draft_model is None
    k_max = cfg.prompt_lookup_num_tokens if lookup else cfg.num_assistant_tokens
    if s.max_new == 0:
        return s.result()
    stats = s.stats
    stats.update(rounds=0, proposed=0, accepted=0, target_forwards=1, draft_forwards=0)
    logits = s.prefill()
    t0 = time.perf_counter()
    draft = None
    if not lookup:
        draft = Runner(s.draft_model, s.batch, s.seq.shape[1])
        draft.prefill(s.seq, s.cur, s.prompt_mask)
        stats["draft_forwards"] += 1
    draft_len = s.cur
    # the first token comes from the prefill, as in plain decoding
    yield s.append(*s.choose(logits), want_lists=want_lists)
    vocab = logits.shape[-1]
    while not s.all_done() and s.cur - s.prompt_len < s.max_new:
        cur = s.cur
        k = min(k_max, s.max_new - (cur - s.prompt_len) - 1)
        active = ~s.finished
        qs: list[torch.Tensor] = []
        if k > 0 and lookup:
            props = [prompt_lookup(s.seq[r, :cur], k, cfg.max_matching_ngram_size,
                                   int(s.pad_len[r]) if s.pad_len is not None else 0) if a else s.seq[r, :0]
                     for r, a in enumerate(active.tolist())]
            k = max(len(p) for p in props)
            for r, p in enumerate(props):
                s.seq[r, cur:cur + k] = s.pad
                s.seq[r, cur:cur + len(p)] = p
            if cfg.do_sample and k:
                qs = list(torch.nn.functional.one_hot(s.seq[:, cur:cur + k], vocab).float().unbind(1))
        elif k > 0:
            dl = draft.forward(s.seq, cur, cur - draft_len)[:, -1].float()     # catch up: 1 or 2 tokens
            stats["draft_forwards"] += 1
            for j in range(k):
                dl = apply_processors(s.processors, s.seq[:, :cur + j], dl) if s.processors else dl
                if cfg.do_sample:
                    q = dl.softmax(dim=-1)
                    qs.append(q)
                    tok = sample(q, s.generator)
                else:
                    tok = dl.argmax(dim=-1)
                s.seq[:, cur + j] = tok
                if j < k - 1:
                    dl = draft.forward(s.seq, cur + j + 1, 1)[:, -1].float()
                    stats["draft_forwards"] += 1
        if k == 0:                                                            # nothing proposed: a plain step
            logits = s.runner.forward(s.seq, cur, 1)[:, -1].float()
            stats["target_forwards"] += 1
            yield s.append(*s.choose(logits), want_lists=want_lists)
            draft_len = min(draft_len, cur)
            continue

        raw = s.runner.forward(s.seq, cur + k, k + 1).float()                  # (B, k+1, V): after last, d_1..d_k
        stats["target_forwards"] += 1
        procd = torch.stack([apply_processors(s.processors, s.seq[:, :cur + j], raw[:, j]) if s.processors
                             else raw[:, j] for j in range(k + 1)], 1)
        drafted = s.seq[:, cur:cur + k].clone()
        if cfg.do_sample:
            n, nxt = accept_sampled(procd.softmax(dim=-1), torch.stack(qs, 1), drafted, s.generator)
        else:
            n, nxt = accept_greedy(procd.argmax(dim=-1), drafted)
        m = int(n[active].min())
        stats["rounds"] += 1
        stats["proposed"] += k * int(active.sum())
        stats["accepted"] += int(n[active].sum())
        last = nxt if m == k else torch.where(n > m, drafted[:, m], nxt)
        chunk_lists: list[list[int]] | None = [[] for _ in range(s.batch)] if want_lists else None
        for j in range(m + 1):
            got = s.append(drafted[:, j] if j < m else last, s.observe(raw[:, j]), want_lists=want_lists)
            if chunk_lists is not None:
                for r, new in enumerate(got):
                    chunk_lists[r] += new
        s.runner.rewind(cur + m)
        if draft is not None:
            draft_len = cur + min(m, k - 1)
            draft.rewind(draft_len)
        yield chunk_lists
    stats["decode_s"] = time.perf_counter() - t0
    if stats["proposed"]:
        stats["acceptance"] = stats["accepted"] / stats["proposed"]
    stats["tokens_per_target_forward"] = (s.cur - s.prompt_len) / max(stats["target_forwards"], 1)
    return s.result()
