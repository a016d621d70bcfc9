"""Kahneman-Tversky optimisation: the loss and the run (``lmstack align kto CONFIG``).

KTO learns from single labelled replies (desirable / undesirable), no pairs needed. Each micro-batch holds
B examples and their B *mismatched* pairs (example i's prompt with example i+1's completion, fixed per
example when the data is loaded, :func:`attach_kl`), whose policy-vs-reference log-ratio estimates the
KL term the loss measures rewards against. Reference log-probs come from the frozen reference (LoRA: the
base with the adapter disabled) or from a cache computed once before training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.align.config import KTOConfig
from lmstack.finetune.sft import Example

IGNORE = -100


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, policy_KL_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, ref_KL_logps: torch.Tensor, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(losses, chosen_rewards, rejected_rewards, kl)`` of a KTO batch; the loss is ``losses.nanmean()``.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7, with trl 1.16's
    ``KTOTrainer`` semantics (``loss_type="kto"``, matched in tests/test_align_losses.py). With the
    log-ratio :math:`h = \log\pi(y|x) - \log\pi_{ref}(y|x)` and the reference point

    .. math:: z_0 = \max\big(0, \operatorname{mean}_i [\log\pi(y_{i+1}|x_i) - \log\pi_{ref}(y_{i+1}|x_i)]\big),

    a batch estimate of :math:`KL(\pi\|\pi_{ref})` from the mismatched pairs, detached (no gradient flows
    through it):

    - desirable: :math:`\lambda_D\,(1 - \sigma(\beta(h - z_0)))`;
    - undesirable: :math:`\lambda_U\,(1 - \sigma(\beta(z_0 - h)))`.

    ``losses`` is the desirable losses then the undesirable ones (weights applied); rewards are
    :math:`\beta h`, detached. The paper's value function is :math:`\lambda\sigma(\cdot)`; the loss
    :math:`\lambda(1-\sigma)` differs by a constant. What KTO drops relative to DPO: the pairing (each
    reply is judged against the KL reference point, not against its rival). Limit :math:`\beta\to 0`:
    every loss tends to :math:`\lambda/2` and the gradient to :math:`\mp\tfrac{\beta\lambda}{4}\nabla h`:
    weighted likelihood up on desirable, down on undesirable replies.
    """
    kl = (policy_KL_logps - ref_KL_logps).mean().detach().clamp(min=0)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def _split(ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids through the assistant marker, response ids) of a tokenized example (unshifted).

    The last label is always a response token (the closing ``<|end|>``, or the last kept one when
    truncated), so ``input_ids + [labels[-1]]`` is the whole rendered sequence."""
    full = ex.input_ids + [ex.labels[-1]]
    start = next(i for i, t in enumerate(ex.labels) if t != IGNORE) + 1
    return full[:start], full[start:]


def mismatched(examples: list[Example], max_len: int | None = None) -> list[Example]:
    """Example k's prompt with example k+1's response (cyclically), truncated to ``max_len``: trl's KL
    completions. Example k's own response had a token within ``max_len``, so this one does too."""
    out = []
    n = len(examples)
    for k in range(n):
        prompt, _ = _split(examples[k])
        _, response = _split(examples[(k + 1) % n])
        ids = (prompt + response)[: (max_len + 1) if max_len is not None else None]
        labels = [IGNORE] * (len(prompt) - 1) + ids[len(prompt):]
        out.append(Example(ids[:-1], labels, examples[k].where))
    return out


def attach_kl(items: list, max_len: int | None = None) -> list:
    """Set each unpaired example's mismatched KL pair (in place; returns ``items``)."""
    for it, kl in zip(items, mismatched([it.example for it in items], max_len)):
        it.kl = kl
    return items


def _batch_loss(cfg: KTOConfig, logps: torch.Tensor, ref: torch.Tensor, label: torch.Tensor):
    b = label.shape[0]
    lab = label.to(logps.device).bool()
    losses, cr, rr, kl = kto_loss(logps[:b][lab], logps[:b][~lab], logps[b:], ref[:b][lab], ref[:b][~lab], ref[b:],
                                  beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                  undesirable_weight=cfg.undesirable_weight)
    return losses, cr, rr, kl


def _metrics(cr: torch.Tensor, rr: torch.Tensor, kl: torch.Tensor) -> dict[str, torch.Tensor]:
    nan = torch.tensor(float("nan"))
    c = cr.mean() if cr.numel() else nan
    r = rr.mean() if rr.numel() else nan
    m = {"kl": kl}
    if cr.numel():
        m["rewards_chosen"] = c
    if rr.numel():
        m["rewards_rejected"] = r
    if cr.numel() and rr.numel():
        m["margin"] = c - r
    return m


def make_loss_fn(cfg: KTOConfig, ref_model: nn.Module | None):
    from lmstack.align.logps import sequence_logps
    from lmstack.align.offline import reference

    def loss_fn(model: nn.Module, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], generator: Any):
        ids, labels = x["input_ids"], y["labels"]
        logps = sequence_logps(model, ids, labels)
        if "ref_logps" in x:
            ref = x["ref_logps"].to(logps.device)
        else:
            with reference(model, ref_model) as r:
                ref = sequence_logps(r, ids, labels)
        losses, cr, rr, kl = _batch_loss(cfg, logps, ref, x["label"])
        return losses.nanmean(), _metrics(cr, rr, kl)

    return loss_fn


def heldout_metrics(policy: list[tuple[float, float]], ref: list[tuple[float, float]], labels: list[bool],
                    cfg: KTOConfig) -> dict[str, float]:
    """Held-out KTO loss (KL estimated over all held-out mismatched pairs), mean rewards of desirable and
    undesirable replies, their margin, and the share of replies whose reward sign matches the label."""
    p, r = torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    lab = torch.tensor(labels)
    logps, refs = torch.cat([p[:, 0], p[:, 1]]), torch.cat([r[:, 0], r[:, 1]])
    losses, cr, rr, kl = _batch_loss(cfg, logps, refs, lab)
    out = {"val_loss": float(losses.nanmean()), **{f"val_{k}": float(v) for k, v in _metrics(cr, rr, kl).items()}}
    rewards = cfg.beta * (p[:, 0] - r[:, 0])
    # a zero reward (the start: policy = reference) has no sign: counted wrong, as DPO counts ties
    out["val_accuracy"] = float((((rewards > 0) & lab) | ((rewards < 0) & ~lab)).double().mean())
    return out


def kto(cfg: KTOConfig) -> dict[str, Any]:
    """Train ``cfg.base`` with KTO on ``cfg.data``; write the run folder; return the summary."""
    from lmstack.runs import remove_if_failed

    with remove_if_failed(cfg.run_dir):
        return _kto(cfg)


def _kto(cfg: KTOConfig) -> dict[str, Any]:
    from lmstack.align.data import PairLoader
    from lmstack.align.offline import (announce, apply_method, cached_logps, finish, fit, frozen_copy, reference,
                                       start_run, train_config, weight_io)
    from lmstack.config import to_dict
    from lmstack.finetune.run import base_fingerprint
    from lmstack.train.trainer import Task

    st = start_run(cfg, "unpaired")
    run, device, model, tok, train, held, stats, pad = (st.run, st.device, st.model, st.tokenizer, st.train, st.held,
                                                        st.stats, st.pad)
    base_config, fingerprint = to_dict(model.config), base_fingerprint(model)
    attach_kl(train, cfg.data.max_len)
    attach_kl(held, cfg.data.max_len)
    ref_model = frozen_copy(model) if cfg.method == "full" else None
    added = apply_method(model, cfg)
    model.to(device)
    with reference(model, ref_model) as r:
        ref_held = cached_logps(r, held, cfg.batch_size, pad, device)
        ref_train = cached_logps(r, train, cfg.batch_size, pad, device) if cfg.precompute_ref else None
    if cfg.precompute_ref:
        ref_model = None
    labels = [it.label for it in held]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return heldout_metrics(cached_logps(m, held, cfg.batch_size, pad, device), ref_held, labels, cfg)

    before = evaluate(model)
    save, load = weight_io(cfg, base_config, fingerprint)
    task = Task(model=model, loader=PairLoader(train, cfg.batch_size, pad, cfg.seed, ref=ref_train),
                eval_batches=lambda: [], tokenizer=tok, save_weights=save, load_weights=load,
                loss_fn=make_loss_fn(cfg, ref_model), evaluate=evaluate)
    summary, seconds = fit(train_config(cfg, run, len(held), model.config.vocab_size), task)
    after = evaluate(model)
    results = {"method": cfg.method, "beta": cfg.beta, "desirable_weight": cfg.desirable_weight,
               "undesirable_weight": cfg.undesirable_weight, "base": cfg.base, "steps": cfg.steps,
               "lr": cfg.learning_rate, "before": before, "after": after, "data": stats, "added": added,
               "tokens_per_s": summary.get("tokens_per_s"), "train_seconds": round(seconds, 2)}
    finish(run, results, render_report(results))
    announce(f"kto ({cfg.method}): held-out reward-sign accuracy {before['val_accuracy']:.3f} -> "
             f"{after['val_accuracy']:.3f}, margin {before.get('val_margin', 0):.4f} -> "
             f"{after.get('val_margin', 0):.4f} -> {run}")
    return results


def render_report(r: dict[str, Any]) -> str:
    d = r["data"]
    lines = [f"KTO (beta {r['beta']:g}, weights desirable {r['desirable_weight']:g} / undesirable "
             f"{r['undesirable_weight']:g}), method **{r['method']}**, {r['steps']} steps at lr {r['lr']:g} on "
             f"{d['train_items']:,} examples; held-out {d['heldout_items']:,}.", "",
             "| held-out | reward sign = label | reward desirable | reward undesirable | margin | KL estimate "
             "| KTO loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("before", "after"):
        m = r[name]
        lines.append(f"| {name} | {m['val_accuracy']:.3f} | {m.get('val_rewards_chosen', float('nan')):.4f} "
                     f"| {m.get('val_rewards_rejected', float('nan')):.4f} | {m.get('val_margin', float('nan')):.4f} "
                     f"| {m['val_kl']:.4f} | {m['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main_config(path: str | None, overrides: list[str]) -> KTOConfig:
    from lmstack.config import load_config

    return load_config(KTOConfig, path, overrides)


__all__ = ["kto_loss", "kto", "mismatched", "attach_kl", "make_loss_fn", "heldout_metrics"]
