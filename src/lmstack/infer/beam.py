"""Beam search with Hugging Face's semantics (so the same config gives the same ids).

Per prompt, ``num_beams`` running hypotheses and a pool of ``num_beams`` finished ones. Each step:

1. log-probs of the next token per running beam (processors applied to the log-probs, as HF does),
   plus the beam's running score -> (B, beams * V) candidates;
2. the best K = max(2, 1 + n_eos) * beams candidates (or K draws without replacement when sampling);
3. a candidate "hits" when its token is a stop id or the length limit is reached. Hits among the top
   ``beams`` candidates join the finished pool with score ``sum logprob / new_len ** length_penalty``;
   the best ``beams`` non-hits keep running (the KV cache rows are reordered to follow their parents);
4. stop when no running beam can still beat the worst finished one: ``early_stopping=True`` stops as
   soon as ``beams`` hypotheses are finished; ``False`` compares the best running score normalised at
   the current length (HF's heuristic); ``"never"`` normalises at the longest length when the length
   penalty is positive (the exact bound).

Returns the ``num_return_sequences`` best finished hypotheses per prompt with their scores, as the
session's :class:`~lmstack.infer.session.GenerationResult`.
"""

from __future__ import annotations

import time

import torch

from lmstack.infer.sampling import apply_processors
from lmstack.infer.session import GenerationResult, Session

DEAD = -1.0e9      # the score that rules a candidate out (HF adds it, so excluded scores stay ordered)


def beam_search(s: Session) -> GenerationResult:
    """Run beam search on a session whose rows are prompts repeated ``num_beams`` times.

    The result's rows are the best ``num_return_sequences`` per prompt, with their ``scores``.
    """
    cfg = s.config
    nb, n_ret = cfg.num_beams, cfg.num_return_sequences
    b = s.n_prompts
    t0, width = s.prompt_len, s.seq.shape[1]
    max_len = t0 + s.max_new                      # HF's max_length
    k = max(2, 1 + len(s.eos)) * nb
    dev = s.device
    top_beam = torch.arange(k, device=dev) < nb   # only the best `nb` candidates may finish

    run_seq = s.seq.view(b, nb, width).clone()
    run_score = torch.zeros(b, nb, device=dev)
    run_score[:, 1:] = DEAD                       # all beams start equal: keep only the first one's candidates
    fin_seq = run_seq.clone()
    fin_score = torch.full((b, nb), DEAD, device=dev)
    fin_done = torch.zeros(b, nb, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(b, nb, dtype=torch.long, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    offsets = (torch.arange(b, device=dev) * nb)[:, None]
    if s.max_new == 0:
        return s.result(*_output(fin_seq, fin_score, fin_len, n_ret, t0, s.eos_t))

    logits = s.prefill()                                                  # (B*nb, V)
    t_start = time.perf_counter()
    cur = t0
    while True:
        logp = logits.log_softmax(dim=-1)
        if s.processors:
            logp = apply_processors(s.processors, run_seq.view(b * nb, width)[:, :cur], logp)
        vocab = logp.shape[-1]
        total = (logp.view(b, nb, vocab) + run_score[:, :, None]).view(b, nb * vocab)
        if cfg.do_sample:
            cand = torch.multinomial(total.softmax(dim=-1), k, generator=s.generator)
            cand_score = total.gather(1, cand)
            cand_score, order = cand_score.sort(dim=-1, descending=True)
            cand = cand.gather(1, order)
        else:
            cand_score, cand = torch.topk(total, k, dim=-1)                # (B, K)
        parent, token = cand // vocab, cand % vocab
        cand_seq = run_seq.gather(1, parent[:, :, None].expand(b, k, width)).clone()
        cand_seq[:, :, cur] = token
        hits = torch.zeros_like(token, dtype=torch.bool)
        if s.eos_t is not None:
            hits = torch.isin(token, s.eos_t)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)

        # the best `nb` candidates that did not hit keep running
        keep_score = cand_score + hits.float() * DEAD
        keep = torch.topk(keep_score, nb, dim=-1).indices                 # (B, nb)
        run_seq = cand_seq.gather(1, keep[:, :, None].expand(b, nb, width))
        run_score = keep_score.gather(1, keep)
        parents = parent.gather(1, keep)

        # candidates that hit join the finished pool if they beat its worst member
        new_len = cur + 1 - t0
        done_score = cand_score / (new_len ** cfg.length_penalty)
        pool_full = fin_done.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        just_done = hits & top_beam[None]
        done_score = (done_score + pool_full.float() * DEAD + (~improvable).float() * DEAD
                      + (~just_done).float() * DEAD)
        merged_score = torch.cat([fin_score, done_score], 1)
        best = torch.topk(merged_score, nb, dim=-1).indices
        fin_seq = torch.cat([fin_seq, cand_seq], 1).gather(1, best[:, :, None].expand(b, nb, width))
        fin_score = merged_score.gather(1, best)
        fin_done = torch.cat([fin_done, just_done], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(token, new_len)], 1).gather(1, best)

        cur += 1
        # can a running beam still beat the worst finished one?
        if cfg.early_stopping == "never" and cfg.length_penalty > 0:
            best_len = max_len - t0
        else:
            best_len = cur - t0
        best_running = run_score[:, :1] / (best_len ** cfg.length_penalty)
        worst_done = torch.where(fin_done, fin_score.min(dim=1, keepdim=True).values, torch.full_like(fin_score, DEAD))
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        open_beams = not (bool(fin_done.all()) and cfg.early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
        s.runner.reorder((parents + offsets).view(-1))
        flat = run_seq.view(b * nb, width)
        logits = s.runner.forward(flat, cur, 1)[:, -1].float()
    s.stats["decode_s"] = time.perf_counter() - t_start
    return s.result(*_output(fin_seq, fin_score, fin_len, n_ret, t0, s.eos_t))


def _output(fin_seq: torch.Tensor, fin_score: torch.Tensor, fin_len: torch.Tensor, n_ret: int, t0: int,
            eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
    """The best ``n_ret`` per prompt, trimmed to the longest; "stopped" = ends with a stop id."""
    seqs = fin_seq[:, :n_ret].reshape(-1, fin_seq.shape[-1])
    lens = fin_len[:, :n_ret].reshape(-1)
    width = t0 + int(lens.max()) if lens.numel() else t0
    last = seqs.gather(1, (t0 + lens - 1).clamp(min=0)[:, None]).squeeze(1)
    stopped = (torch.isin(last, eos) & (lens > 0)) if eos is not None else torch.zeros_like(lens, dtype=torch.bool)
    return seqs[:, :width], fin_score[:, :n_ret].reshape(-1), lens.tolist(), stopped.tolist()
