"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
Mathematical Reasoning in Open Language Models", sec. 4.1), with the Dr.GRPO and DAPO variants.

For each prompt ``q`` sample a group of ``G`` responses ``o_1..o_G`` from the rollout policy
``pi_old`` and score them, ``r_1..r_G``. No value model: the baseline is the group's mean,

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)          (std with Bessel's correction; every token of o_i gets A_i)

and the loss is PPO's clipped surrogate per token plus a KL penalty to the frozen reference ``pi_ref``::

    rho_it   = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    l_it     = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it
    KL_it    = pi_ref / pi - log(pi_ref / pi) - 1     (the k3 estimator, Schulman 2020: unbiased, >= 0)

    grpo     L = mean_i [ sum_t l_it / |o_i| ]                 (DeepSeekMath: per-sequence mean, then mean)
    dr_grpo  L = sum_it l_it / (G_total * max_new_tokens)      (Liu et al. 2025, "Understanding R1-Zero-Like
             Training: A Critical Perspective": no length normalisation; pair with ``scale="none"``, no std)
    dapo     L = sum_it l_it / sum_i |o_i|                     (Yu et al. 2025, DAPO: token-level mean, so
             long responses weigh per token, not per sequence; its clip-higher is ``epsilon_high``)

These are exactly ``trl`` 1.16 ``GRPOTrainer``'s ``loss_type`` "grpo", "dr_grpo" and "dapo" (one process,
``steps_per_generation`` 1; the tests check it). With ``beta = 0`` the KL term and the reference forward
vanish; with one pass per buffer (``rho = 1``) the loss's gradient is the REINFORCE gradient with the
group-mean baseline. A sample whose reward is NaN (a failing reward function) gets ``A = 0`` and no tokens
in the mask: no gradient, never a NaN.

:func:`speedrun_grpo` is the speedrun's stage: a short supervised warm-up on easy synthetic arithmetic (the
tiny pre-trained model has never seen any), then GRPO with verifiable rewards; held-out exact match before
and after.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.align.logps import token_logps


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """``(r - mean_group(r)) / (std_group(r) + 1e-4)`` per sample (``scale="none"``: no division), over
    consecutive groups of ``group_size``; NaN rewards are left out of their group's statistics and get 0."""
    r = rewards.view(-1, group_size).float()
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / n.clamp(min=1)
    var = torch.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    adv = r - mean
    if scale == "group":
        adv = adv / (var.sqrt() + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    adv = torch.where(valid & (n > 1), adv, 0.0)   # a lone valid sample has no baseline: no signal
    return adv.view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1``: Schulman's k3 estimate of KL(pi || pi_ref)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.04, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo", max_completion_length: int | None = None,
              num_tokens: torch.Tensor | float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRPO policy loss (see the module docstring); tensors in, tensors out.

    ``logps``, ``old_logps``, ``ref_logps`` (B, T): per-token log-probs of the sampled response tokens under
    the policy being trained, the rollout policy and the reference (``ref_logps`` may be None when
    ``beta == 0``); ``advantages`` (B,) or (B, T); ``mask`` (B, T) 1 on response tokens. ``loss_type``
    "grpo" | "dr_grpo" (needs ``max_completion_length``) | "dapo" (normalised by ``num_tokens``, default the
    mask's sum; pass the whole optimizer step's count under gradient accumulation).

    Returns ``(loss, per_token_kl, clipped)``: the scalar loss, the k3 KL (B, T) (zeros when ``beta == 0``)
    and where the clip was active (B, T) bool.
    """
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logps)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("grpo_loss: loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype)
        loss = (per_token * mask).sum() / denom.clamp(min=1.0)
    else:
        raise ValueError(f"grpo_loss: loss_type must be grpo, dr_grpo or dapo, got {loss_type!r}")
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return loss, kl, clipped


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy (B, T) of the next-token distribution, no gradient."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)


def make_grpo_loss_fn(beta: float, epsilon: float, epsilon_high: float | None, loss_type: str,
                      max_new_tokens: int, temperature: float = 1.0):
    """The trainer's ``loss_fn(model, x, y, generator)`` for a rollout minibatch (see online.RolloutLoader)."""

    def loss_fn(model: torch.nn.Module, x: dict[str, Any], y: Any, generator: Any):
        logits = model(x["input_ids"])
        if temperature != 1.0:            # the sampling distribution the rollouts came from
            logits = logits / temperature
        logps = token_logps(logits, x["labels"])
        mask = x["mask"]
        loss, kl, clipped = grpo_loss(logps, x["old_logps"], x["ref_logps"] if beta else None, x["advantages"],
                                      mask, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                                      loss_type=loss_type, max_completion_length=max_new_tokens,
                                      num_tokens=x.get("step_tokens"))
        metrics = {"kl": masked_mean(kl.detach(), mask), "clip_frac": masked_mean(clipped.float(), mask),
                   "entropy": masked_mean(entropy_of(logits), mask), **x.get("stats", {})}
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------------------
# the speedrun stage


def speedrun_grpo(run_dir: str | os.PathLike, base: str | os.PathLike | None = None, *, warmup_steps: int = 300,
                  grpo_steps: int = 128, seed: int = 1337, warmup: dict[str, Any] | None = None,
                  warmup_chains: int = 300, required_form: float = 1.0,
                  **overrides: Any) -> tuple[dict[str, Any], str]:
    """The speedrun's GRPO stage: supervised warm-up on easy synthetic arithmetic, then GRPO with verifiable
    rewards (strict exact match + the ``<think>`` format), on the pre-trained tiny model.

    The task: 3-term problems over 0..9 whose every running value stays in 0..9, split by a hash of the
    question (a quarter held out). The warm-up trains on every one-step fact and on the first
    ``warmup_chains`` train-side problems; GRPO's prompts are the train-side problems *after* those (new to
    the policy, as the held-out ones are), so a rise in held-out accuracy is a skill learnt by RL and not the
    recall of answers to prompts it trained on. ``required_form``: the share of worked solutions ending in the
    required ``#### N`` (the rest say ``The answer is N.``); below 1 the strict extraction has the answer
    form to learn besides the arithmetic.

    ``base`` defaults to the first of ``RUN/pretrain``, ``RUN/train``, ``RUN/model`` holding a model; the
    tokenizer is the base's or ``RUN/tokenizer.json``. Writes ``RUN/grpo/warmup/`` (the fine-tuning run) and
    ``RUN/grpo/rl/`` (the GRPO run: metrics.jsonl, reward.png, summary.json) and ``RUN/grpo/summary.json``.
    ``warmup``: :class:`lmstack.finetune.run.FinetuneConfig` fields for the warm-up; ``arithmetic``: the
    synthetic task (``max_operand``, ``n_terms``, ``ops``, ``max_value``, ``heldout_items``); other
    ``overrides`` are :class:`lmstack.align.rl_config.OnlineConfig` fields (nested dicts). Returns the results
    (held-out strict and lenient exact match after the warm-up and after GRPO, their paired change with a
    95% interval, the time split) and a markdown section.
    """
    import json
    import random

    from lmstack.align.online import run_online
    from lmstack.align.rl_config import OnlineConfig
    from lmstack.align.rl_data import arithmetic_facts, arithmetic_items, sft_rows
    from lmstack.config import from_dict, merge
    from lmstack.errors import DataError
    from lmstack.finetune.run import FinetuneConfig, finetune, speedrun_base
    from lmstack.runs import atomic_write_json, atomic_write_text

    t0 = time.perf_counter()
    run = Path(run_dir)
    base, tok = speedrun_base(run, base)
    arith = {"max_operand": 9, "n_terms": 3, "ops": ["+", "-"], "max_value": 9, "heldout_items": 300,
             **overrides.pop("arithmetic", {})}
    held_frac = 0.25
    space = {k: arith[k] for k in ("max_operand", "n_terms", "ops", "max_value")}
    every_train = arithmetic_items(None, split="train", seed=seed, heldout_fraction=held_frac, **space)
    n_held = len(arithmetic_items(None, split="heldout", seed=seed, heldout_fraction=held_frac, **space))
    arith["heldout_items"] = min(int(arith["heldout_items"]), n_held)
    if not 0 < warmup_chains < len(every_train):
        raise DataError(f"warmup_chains = {warmup_chains}: the task has {len(every_train)} train-side problems; "
                        f"keep some for GRPO's prompts (1..{len(every_train) - 1})")
    arith.setdefault("train_offset", warmup_chains)      # 0 would give RL the warm-up's own prompts
    arith.setdefault("train_items", len(every_train) - arith["train_offset"])
    out = run / "grpo"
    data_dir = out / "warmup_data"
    data_dir.mkdir(parents=True, exist_ok=True)

    # the warm-up: every one-step fact, and the first warmup_chains train-side problems; GRPO's prompts are the
    # train-side problems after them and the held-out ones are never trained on, but each of their steps is a
    # known fact, so answering them takes the procedure (chain the steps), not recall of a memorised answer
    warm_items = [dict(it) for it in every_train[:warmup_chains]]
    if arith["n_terms"] > 2:
        warm_items += arithmetic_facts(max_operand=arith["max_operand"], ops=arith["ops"],
                                       max_value=arith.get("max_value"))
    rng = random.Random(seed)
    for it in warm_items:
        if rng.random() >= required_form:
            it["solution"] = it["solution"].replace(f"\n#### {it['answer']}", f"\nThe answer is {it['answer']}.")
    atomic_write_text(data_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in sft_rows(warm_items)))
    ft = from_dict(FinetuneConfig, merge({
        "run_dir": str(out / "warmup"), "base": str(base), "tokenizer": tok, "method": "full", "seed": seed,
        "steps": warmup_steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "log_every": 25, "n_samples": 0,
        "data": {"train": [str(data_dir / "train.jsonl")], "valid_fraction": 0.1, "max_len": 64}}, warmup or {}))
    t_warm = time.perf_counter()
    finetune(ft)
    warm_s = time.perf_counter() - t_warm
    # lr 2e-5 over buffers of 16 prompts: at 1e-4 over 8 prompts the rollout reward itself fell within 64 steps
    # (Adam gives a noisy gradient a full-size step); docs/align.md "Measured" has the sweep
    fields = {
        "algo": "grpo", "run_dir": str(out / "rl"), "base": str(out / "warmup"), "tokenizer": tok, "method": "full",
        "seed": seed, "steps": grpo_steps, "minibatch_size": 32, "lr": 2e-5, "warmup_steps": 4, "log_every": 4,
        "eval_every": max(grpo_steps // 4, 1),      # the held-out curve: 300 greedy answers take ~0.4 s
        "data": {"source": "arithmetic", "eval_items": arith["heldout_items"], "heldout_fraction": held_frac,
                 "arithmetic": arith},
        "rollout": {"prompts": 16, "num_samples": 8, "max_new_tokens": 40, "temperature": 0.7},
        "reward": {"correct": 1.0, "format": 0.2}, "grpo": {"beta": 0.02},
    }
    cfg = from_dict(OnlineConfig, merge(fields, overrides))
    results = run_online(cfg)
    results["warmup_seconds"] = round(warm_s, 2)
    results["warmup_chains"] = warmup_chains
    results["required_form"] = required_form
    results["seconds_total"] = round(time.perf_counter() - t0, 2)
    report = render_speedrun_report(results, cfg)      # links are relative to RUN (the speedrun's report.md)
    atomic_write_json(out / "summary.json", results)
    b, a = results["before"], results["after"]
    print(f"[grpo] held-out exact match strict {b['exact_match_strict']:.3f} -> {a['exact_match_strict']:.3f}, "
          f"lenient {b['exact_match_lenient']:.3f} -> {a['exact_match_lenient']:.3f} in "
          f"{results['seconds_total']:.0f} s", file=sys.stderr)
    return results, report


def _bound(a_cfg: Any) -> str:
    return f", every running value in 0..{a_cfg.max_value}" if getattr(a_cfg, "max_value", None) is not None else ""


def render_speedrun_report(r: dict[str, Any], cfg: Any) -> str:
    from lmstack.align.online import paired_line

    b, a = r["before"], r["after"]
    t = r["timing"]
    a_cfg = cfg.data.arithmetic
    lines = [
        (f"The tiny model never saw arithmetic, so it first gets a short supervised warm-up ({r.get('warmup_seconds', 0):.0f} s, "
        f"full fine-tuning on worked `<think>...</think>` solutions: every one-step fact with operands "
        f"0..{a_cfg.max_operand}{_bound(a_cfg)} and {r.get('warmup_chains', a_cfg.train_offset)} of the "
        f"{a_cfg.n_terms}-term problems, {r.get('required_form', 1.0):.0%} of them ending in the required `#### N`). "
        f"Then **GRPO** ({cfg.steps} steps, {cfg.rollout.prompts} prompts x G={cfg.rollout.num_samples} samples "
        f"per rollout at temperature {cfg.rollout.temperature}, lr {cfg.lr:g}, beta {cfg.grpo.beta}, loss "
        f"`{cfg.grpo.loss_type}`) with a verifiable reward: strict exact match + {cfg.reward.format} x the format "
        f"reward, on {r['train_prompts']} other {a_cfg.n_terms}-term problems the warm-up never saw. The "
        f"held-out problems are in neither set; each of their steps is a known fact, so answering them takes "
        f"chaining the steps, not recall."), "",
        (f"| held-out synthetic arithmetic ({r['heldout_items']} items, greedy) | after warm-up (before GRPO) "
        f"| after GRPO |"), "|---|---:|---:|",
        f"| exact match, strict (`#### N`) | {b['exact_match_strict']:.3f} | {a['exact_match_strict']:.3f} |",
        f"| exact match, lenient (last number) | {b['exact_match_lenient']:.3f} | {a['exact_match_lenient']:.3f} |",
        f"| mean reward | {b['reward_mean']:.3f} | {a['reward_mean']:.3f} |", "",
        paired_line(r["paired"]) if r.get("paired") else "", "",
        (f"Rollout reward (mean over the buffer's samples): {r['reward_first']:.3f} in the first buffer, "
         f"{r['reward_last']:.3f} in the last." if r.get("reward_first") is not None else ""), "",
        (f"Time: rollouts {t['rollout_s']:.1f} s ({t['rollout_fraction']:.0%} of the GRPO loop, "
        f"{t['rollout_tokens_per_s']:.0f} generated tokens/s), updates {t['update_s']:.1f} s."), "",
        f"![reward curve]({Path(r['reward_curve']).relative_to(Path(cfg.run_dir).parent.parent)})"
        if r.get("reward_curve") else "", ""]
    if r.get("reward_failures"):
        lines.append(r["reward_summary"])
    return "\n".join(lines)
