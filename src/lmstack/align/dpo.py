"""Direct preference optimisation: the loss, the run (``lmstack align dpo CONFIG``), the speedrun stage.

The same run trains the reference-free SimPO and ORPO (``loss_type = "simpo" | "orpo"``): the pairs, the
loader, the logging and the report are shared; no reference model is built or cached for them.

A run trains the policy (full or LoRA) on preference pairs through the one trainer (its ``Task`` hook):
each micro-batch is the chosen rows then the rejected rows, one forward scores both, and the reference's
log-probs come either from the frozen reference in the same step or from a cache computed once per pair
before training (``precompute_ref``). With LoRA the reference is the base itself with the adapter
disabled (:func:`lmstack.finetune.lora.adapters_disabled`), so no second copy of the model is held.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.align.config import DPO_LOSSES, REFERENCE_FREE_LOSSES, DPOConfig
from lmstack.errors import ConfigError, DataError


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-pair preference losses and the implicit rewards: ``(losses, chosen_rewards, rejected_rewards)``.

    Inputs are (B,) sequence log-probs of the response tokens under the policy and the reference
    (:func:`lmstack.align.logps.sequence_logps`). With the log-ratios
    :math:`h_c = \log\pi(y_c|x) - \log\pi_{ref}(y_c|x)`, :math:`h_r` likewise, and
    :math:`\Delta = h_c - h_r`:

    - ``"sigmoid"`` (DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
      Secretly a Reward Model", eq. 7): :math:`-\log\sigma(\beta\Delta)`, the Bradley-Terry likelihood of
      the preference under the implicit reward :math:`r = \beta h`. With ``label_smoothing`` :math:`\epsilon`
      > 0 it is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"): the label
      is taken to be flipped with probability :math:`\epsilon`,
      :math:`-(1-\epsilon)\log\sigma(\beta\Delta) - \epsilon\log\sigma(-\beta\Delta)`; this was trl's
      ``sigmoid`` loss up to 0.x (trl 1.x's ``sigmoid`` ignores ``label_smoothing``: identical at 0).
      Its gradient vanishes as :math:`\Delta\to\infty` only without smoothing; with it the loss has a
      finite optimum :math:`\beta\Delta = \log((1-\epsilon)/\epsilon)`.
    - ``"robust"`` (rDPO, Chowdhury et al. 2024, "Provably Robust DPO", eq. 8), trl's ``robust``:
      :math:`[-(1-\epsilon)\log\sigma(\beta\Delta) + \epsilon\log\sigma(-\beta\Delta)] / (1-2\epsilon)`,
      an unbiased estimate of the clean-label loss under flip rate :math:`\epsilon`.
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", eq. 17), trl's ``ipo``: :math:`(\Delta - 1/(2\beta))^2`, a squared loss that drops the
      sigmoid, so it regresses the margin to a fixed target instead of pushing it to infinity (DPO's
      overfitting on deterministic preferences). As in trl the log-probs are *averaged* over each
      response's tokens: pass ``sequence_logps(..., average=True)`` (the DPO run does this for ``ipo``).

    Rewards are :math:`\beta h_c`, :math:`\beta h_r`, detached (for logging; accuracy is
    ``chosen_rewards > rejected_rewards``, ties count as wrong, as in trl). At initialisation
    (policy = reference) :math:`\Delta = 0` and the sigmoid loss is exactly :math:`\ln 2`.

    Limit :math:`\beta\to 0`: :math:`-\log\sigma(\beta\Delta) = \ln 2 - \beta\Delta/2 + O(\beta^2)`, so the
    gradient becomes :math:`-\tfrac{\beta}{2}\nabla(\log\pi(y_c) - \log\pi(y_r))`: raising the chosen
    log-likelihood and lowering the rejected one, unweighted, with no pull toward the reference (the
    reference terms are constants). DPO's per-pair weight :math:`\sigma(-\beta\Delta)` is what goes.
    """
    if loss_type not in DPO_LOSSES:
        raise ConfigError(f"loss_type: must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6):
    ``(losses, chosen_rewards, rejected_rewards)`` from *token-averaged* policy log-probs
    (``sequence_logps(..., average=True)``), no reference model.

    :math:`-\log\sigma(\beta(\bar\ell_c - \bar\ell_r) - \gamma)` with the target margin :math:`\gamma`, smoothed
    like cDPO with ``label_smoothing``; trl's ``CPOTrainer`` with ``loss_type="simpo"`` (``simpo_gamma`` =
    :math:`\gamma`). What it drops relative to DPO: the reference (the reward is the length-normalised
    log-likelihood itself), so nothing holds the policy near its start but the data.
    """
    logits = (policy_chosen_logps - policy_rejected_logps) - gamma / beta
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def orpo_odds_ratio(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 0.1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 4 and 7) from token-averaged policy log-probs: ``(losses, chosen_rewards, rejected_rewards)``
    with ``losses`` :math:`= \beta\log\sigma(\log\frac{odds(y_c)}{odds(y_r)})`,
    :math:`odds(y) = p/(1-p)`, :math:`p = e^{\bar\ell}` (trl's ``ORPOTrainer.odds_ratio_loss``, same sign: ORPO's
    total loss is the chosen reply's SFT loss *minus* the mean of these). No reference model.
    """
    def log1mexp(x: torch.Tensor) -> torch.Tensor:  # log(1 - e^x), stable on both sides of -ln 2
        return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    c, r = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return beta * F.logsigmoid(log_odds), beta * c.detach(), beta * r.detach()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The logged reward numbers of a batch of pairs (means over pairs)."""
    return {"rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "accuracy": (chosen_rewards > rejected_rewards).float().mean()}


def token_averaged(loss_type: str) -> bool:
    """IPO, SimPO and ORPO compare per-token mean log-probs; DPO and robust DPO compare sums."""
    return loss_type in ("ipo", "simpo", "orpo")


def pair_loss(cfg: DPOConfig, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
              ref_rejected: torch.Tensor | None, chosen_nll: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's scalar loss and the implicit rewards for ``cfg.loss_type``.

    - DPO types: the mean of :func:`dpo_loss`.
    - SimPO: the mean of :func:`simpo_loss`.
    - ORPO: the chosen replies' NLL minus the mean odds-ratio term (Hong et al. 2024, eq. 6).
      ``chosen_nll`` is the token-level mean over the batch, as trl's ``ORPOTrainer`` takes it; by default it
      is the mean of the per-reply means.
    """
    if cfg.loss_type == "simpo":
        losses, cr, rr = simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                    label_smoothing=cfg.label_smoothing)
        return losses.mean(), cr, rr
    if cfg.loss_type == "orpo":
        ratio, cr, rr = orpo_odds_ratio(chosen, rejected, beta=cfg.beta)
        nll = chosen_nll if chosen_nll is not None else -chosen.mean()
        return nll - ratio.mean(), cr, rr
    assert ref_chosen is not None and ref_rejected is not None
    losses, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=cfg.label_smoothing)
    return losses.mean(), cr, rr


def make_loss_fn(cfg: DPOConfig, ref_model: nn.Module | None):
    """The Task's ``loss_fn``: ``x = {"input_ids" (2B, T)[, "ref_logps" (2B,)]}``, ``y = {"labels"}``."""
    from lmstack.align.logps import IGNORE, sequence_logps
    from lmstack.align.offline import reference

    average = token_averaged(cfg.loss_type)
    free = cfg.loss_type in REFERENCE_FREE_LOSSES

    def loss_fn(model: nn.Module, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], generator: Any):
        ids, labels = x["input_ids"], y["labels"]
        logps = sequence_logps(model, ids, labels, average=average)
        b = ids.shape[0] // 2
        ref = None
        if not free and "ref_logps" in x:
            ref = x["ref_logps"].to(logps.device)
        elif not free:
            with reference(model, ref_model) as r:
                ref = sequence_logps(r, ids, labels, average=average)
        nll = None
        if cfg.loss_type == "orpo":      # token-level mean over the chosen replies of the batch
            n = (labels[:b] != IGNORE).sum(-1).to(logps.dtype)
            nll = -(logps[:b] * n).sum() / n.sum().clamp(min=1)
        loss, cr, rr = pair_loss(cfg, logps[:b], logps[b:], None if ref is None else ref[:b],
                                 None if ref is None else ref[b:], nll)
        return loss, pair_metrics(cr, rr)

    return loss_fn


def heldout_metrics(policy: list[tuple[float, float]], ref: list[tuple[float, float]] | None, cfg: DPOConfig,
                    policy_sums: list[tuple[float, float]] | None = None) -> dict[str, float]:
    """The run's loss, implicit-reward accuracy and margin on held-out pairs, and how often the policy alone
    gives the chosen reply the higher log-likelihood (``logp_accuracy``). ``ref`` is None for SimPO/ORPO."""
    p = torch.tensor(policy, dtype=torch.float64)
    r = torch.tensor(ref, dtype=torch.float64) if ref is not None else None
    loss, cr, rr = pair_loss(cfg, p[:, 0], p[:, 1], None if r is None else r[:, 0], None if r is None else r[:, 1])
    m = {f"val_{k}": float(v) for k, v in pair_metrics(cr, rr).items()}
    sums = torch.tensor(policy_sums if policy_sums is not None else policy, dtype=torch.float64)
    m["val_logp_accuracy"] = float((sums[:, 0] > sums[:, 1]).double().mean())
    return {"val_loss": float(loss), **m}


def dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Train ``cfg.base`` with DPO on ``cfg.data``; write the run folder; return the summary (see docs/align.md)."""
    from lmstack.runs import remove_if_failed

    with remove_if_failed(cfg.run_dir):
        return _dpo(cfg)


def _dpo(cfg: DPOConfig) -> dict[str, Any]:
    from lmstack.align.data import PairLoader
    from lmstack.align.offline import (announce, apply_method, cached_logps, finish, fit, frozen_copy, reference,
                                       start_run, train_config, weight_io)
    from lmstack.config import to_dict
    from lmstack.finetune.run import base_fingerprint
    from lmstack.train.trainer import Task

    st = start_run(cfg, "pairs")
    run, device, model, tok, train, held, stats, pad = (st.run, st.device, st.model, st.tokenizer, st.train, st.held,
                                                        st.stats, st.pad)
    base_config, fingerprint = to_dict(model.config), base_fingerprint(model)
    free = cfg.loss_type in REFERENCE_FREE_LOSSES
    ref_model = frozen_copy(model) if cfg.method == "full" and not free else None
    added = apply_method(model, cfg)
    model.to(device)
    average = token_averaged(cfg.loss_type)
    ref_held, ref_train = None, None
    if not free:
        with reference(model, ref_model) as r:
            ref_held = cached_logps(r, held, cfg.batch_size, pad, device, average)
            ref_train = cached_logps(r, train, cfg.batch_size, pad, device, average) if cfg.precompute_ref else None
        if cfg.precompute_ref:
            ref_model = None  # the cache is the reference now: no copy held during training

    def evaluate(m: nn.Module) -> dict[str, float]:
        pol = cached_logps(m, held, cfg.batch_size, pad, device, average)
        sums = cached_logps(m, held, cfg.batch_size, pad, device) if average else None
        return heldout_metrics(pol, ref_held, cfg, sums)

    before = evaluate(model)
    save, load = weight_io(cfg, base_config, fingerprint)
    task = Task(model=model, loader=PairLoader(train, cfg.batch_size, pad, cfg.seed, ref=ref_train),
                eval_batches=lambda: [], tokenizer=tok, save_weights=save, load_weights=load,
                loss_fn=make_loss_fn(cfg, ref_model), evaluate=evaluate)
    summary, seconds = fit(train_config(cfg, run, len(held), model.config.vocab_size), task)
    after = evaluate(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results = {"method": cfg.method, "loss_type": cfg.loss_type, "beta": cfg.beta,
               "label_smoothing": cfg.label_smoothing, "base": cfg.base, "steps": cfg.steps, "lr": cfg.learning_rate,
               "precompute_ref": cfg.precompute_ref, "before": before, "after": after, "data": stats,
               "params_trainable": n_train, "added": added, "tokens_per_s": summary.get("tokens_per_s"),
               "train_seconds": round(seconds, 2)}
    finish(run, results, render_report(results))
    announce(f"dpo ({cfg.loss_type}, {cfg.method}): held-out implicit-reward accuracy {before['val_accuracy']:.3f} -> "
             f"{after['val_accuracy']:.3f}, margin {before['val_margin']:.4f} -> {after['val_margin']:.4f} -> {run}")
    return results


def render_report(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    d = r["data"]
    lines = [f"{'DPO' if r['loss_type'] in DPO_LOSSES else r['loss_type'].upper()} (**{r['loss_type']}**, "
             f"beta {r['beta']:g}, label smoothing {r['label_smoothing']:g}), method "
             f"**{r['method']}**, {r['steps']} steps at lr {r['lr']:g} on {d['train_items']:,} pairs; "
             f"held-out {d['heldout_items']:,} pairs.", "",
             "| held-out | implicit-reward accuracy | margin (chosen - rejected) | reward chosen | reward rejected "
             "| policy log-prob prefers chosen | loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in (("before", b), ("after", a)):
        lines.append(f"| {name} | {m['val_accuracy']:.3f} | {m['val_margin']:.4f} | {m['val_rewards_chosen']:.4f} "
                     f"| {m['val_rewards_rejected']:.4f} | {m['val_logp_accuracy']:.3f} | {m['val_loss']:.4f} |")
    if r["loss_type"] in REFERENCE_FREE_LOSSES:
        lines += ["", f"{r['loss_type'].upper()} is reference-free: the implicit reward is beta times the reply's "
                  "mean token log-prob under the policy; the log-prob column compares summed log-probs.", ""]
    else:
        lines += ["", "Before training the policy is the reference, so every implicit reward is 0 (accuracy counts "
                  "ties as wrong, as trl does); the log-prob column is the policy's own preference.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# speedrun stage


def corrupt_answer(answer: str, other: str, k: int) -> str:
    """A dispreferred reply built from the right one: another question's answer (even ``k``), or the
    right answer's words in a shuffled order (odd ``k``: fluent-looking tokens, wrong text)."""
    if k % 2 == 0 and other.strip() != answer.strip():
        return other
    words = answer.split()
    rng = random.Random(k)
    for _ in range(5):
        rng.shuffle(words)
        if " ".join(words) != answer:
            break
    return " ".join(words)


def speedrun_pairs(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs from SFT rows (``instruction``/``output``): the correct answer is chosen, a
    corrupted one (:func:`corrupt_answer`) rejected."""
    if len(rows) < 2:
        raise DataError("speedrun DPO: need at least two SFT rows to build preference pairs")
    rng = random.Random(seed)
    out = []
    for k, row in enumerate(rows):
        other = rows[(k + 1 + rng.randrange(len(rows) - 1)) % len(rows)]["output"]
        out.append({"prompt": row["instruction"], "chosen": row["output"],
                    "rejected": corrupt_answer(row["output"], other, k)})
    return out


def _sft_model(run: Path) -> Path:
    for cand in (run / "chat_model", run / "sft"):
        if (cand / "model_config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise DataError(f"{run}: no SFT model (RUN/chat_model or RUN/sft with model.safetensors); run the sft stage")


def speedrun_dpo(run_dir: str | os.PathLike, base: str | os.PathLike | None = None, steps: int = 60,
                 n_train: int = 256, n_heldout: int = 96, **overrides: Any) -> tuple[dict[str, Any], str]:
    """The speedrun's DPO stage: DPO (full fine-tuning, reference log-probs cached) on the SFT model with pairs
    built from the SFT data.

    ``base`` defaults to ``RUN/chat_model`` (the merged SFT model), else ``RUN/sft`` when it holds a full
    model. Pairs come from ``RUN/sft/sft_data/{train,valid}.jsonl`` (the stdlib docstring Q&A the SFT stage
    learned; generated afresh when absent): chosen = the docstring answer, rejected = a corrupted one
    (another function's answer, or the answer's words shuffled). Held-out pairs come from the SFT
    held-out rows. Writes ``RUN/dpo/`` (``model.safetensors``: the aligned model); returns the results and a
    markdown section with the held-out
    implicit-reward accuracy and margin before and after.
    """
    from lmstack.config import from_dict, merge
    from lmstack.runs import atomic_write_text

    run = Path(run_dir)
    base = Path(base) if base is not None else _sft_model(run)
    data_dir = run / "dpo" / "pref_data"
    sft_dir = run / "sft" / "sft_data"
    if (sft_dir / "train.jsonl").is_file() and (sft_dir / "valid.jsonl").is_file():
        from lmstack.sources import iter_rows

        train_rows = [r for _, r in iter_rows([sft_dir / "train.jsonl"])]
        valid_rows = [r for _, r in iter_rows([sft_dir / "valid.jsonl"])]
    else:
        from lmstack.finetune.sft import default_sft_rows

        rows = default_sft_rows(n_train + n_heldout)
        train_rows, valid_rows = rows[n_heldout:], rows[:n_heldout]
    if len(valid_rows) < 2:
        valid_rows, train_rows = train_rows[:n_heldout], train_rows[n_heldout:]
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows[:n_train]), ("valid", valid_rows[:n_heldout])):
        atomic_write_text(data_dir / f"{name}.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in speedrun_pairs(rows)))
    tok = str(base) if (base / "tokenizer.json").is_file() else str(run)
    # full fine-tuning: on the speedrun model LoRA moved the margin 3x less in the same time (docs/align.md)
    fields = {"run_dir": str(run / "dpo"), "base": str(base), "tokenizer": tok, "method": "full", "steps": steps,
              "batch_size": 8, "lr": 1e-3, "beta": 0.1, "log_every": 5, "warmup_steps": 3,
              "data": {"train": [str(data_dir / "train.jsonl")], "valid": [str(data_dir / "valid.jsonl")],
                       "max_len": 128}}
    cfg = from_dict(DPOConfig, merge(fields, overrides))
    results = dpo(cfg)
    b, a = results["before"], results["after"]
    report = (f"Preference pairs built from the SFT data: the docstring answer is chosen, a corrupted one (another "
              f"function's answer, or its words shuffled) rejected. {render_report(results)}"
              f"Held-out implicit-reward accuracy **{b['val_accuracy']:.3f} -> {a['val_accuracy']:.3f}**, margin "
              f"**{b['val_margin']:.4f} -> {a['val_margin']:.4f}**; the policy's own log-likelihood prefers the "
              f"chosen reply on {b['val_logp_accuracy']:.1%} -> {a['val_logp_accuracy']:.1%} of held-out pairs.\n")
    return results, report


def main_config(path: str | None, overrides: list[str]) -> DPOConfig:
    from lmstack.config import load_config

    return load_config(DPOConfig, path, overrides)


__all__ = ["dpo_loss", "simpo_loss", "orpo_odds_ratio", "pair_loss", "dpo", "speedrun_dpo", "speedrun_pairs",
           "make_loss_fn", "heldout_metrics"]
