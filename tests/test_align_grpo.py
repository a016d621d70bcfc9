"""GRPO: the loss against trl 1.16's GRPOTrainer on the same inputs, the advantages against trl's nanstd, the
documented limits (beta 0; one pass = REINFORCE with the group baseline), a run on the one trainer (full
fine-tuning and LoRA, the reference never changes, failing rewards counted, exact resume), the CLI edge, the
speedrun hook on a tiny run and GSM8K end to end.

How the trl parity is computed: ``GRPOTrainer._compute_loss`` is called unbound on a minimal object that
holds the attributes it reads (loss type, clip ranges, beta, an identity accelerator) and whose
``_get_per_token_logps_and_entropies`` returns our fixed per-token log-probs, so trl's own loss code runs on
exactly the tensors our :func:`grpo_loss` gets.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmstack.align import grpo_loss
from lmstack.align.grpo import group_advantages, k3_kl

# ----------------------------------------------------------------------------------------------- trl parity


def _inputs(seed=0, b=6, t=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logps = old + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)   # ratios well outside the clip
    ref = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    for i, n in enumerate([7, 3, 5, 1, 6, 4]):
        mask[i, n:] = 0
    return logps, old, ref, adv, mask


def _trl_loss(logps, old, ref, adv, mask, *, beta, eps, eps_high, loss_type, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logps.shape
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction="sum": x, sync_gradients=True),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_matches_trl(loss_type, beta, eps_high):
    logps, old, ref, adv, mask = _inputs()
    want, metrics = _trl_loss(logps, old, ref, adv, mask, beta=beta, eps=0.2, eps_high=eps_high or 0.2,
                              loss_type=loss_type, max_len=9)
    got, kl, clipped = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                                 loss_type=loss_type, max_completion_length=9)
    assert abs(float(got) - float(want)) < 1e-6
    assert float(clipped.float().mul(mask).sum() / mask.sum()) > 0.1         # the clip really was exercised
    if beta:
        assert abs(float((kl * mask).sum() / mask.sum()) - metrics["kl"][0]) < 1e-6
    assert abs(float((clipped.float() * mask).sum() / mask.sum()) - metrics["clip_ratio/region_mean"][0]) < 1e-6


def test_group_advantages_match_trl_nanstd():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(1)
    r = torch.rand(12, generator=g)
    r[[2, 7]] = math.nan                       # failed rewards: out of their group's mean and std
    groups = r.view(3, 4)
    mean = torch.nanmean(groups, 1).repeat_interleave(4)
    std = nanstd(groups, dim=1).repeat_interleave(4)
    want = (r - mean) / (std + 1e-4)
    got = group_advantages(r, 4)
    ok = ~torch.isnan(r)
    assert torch.allclose(got[ok], want[ok], atol=1e-6)
    assert torch.equal(got[~ok], torch.zeros(2))
    assert torch.allclose(group_advantages(r, 4, scale="none")[ok], (r - mean)[ok], atol=1e-7)
    assert torch.equal(group_advantages(torch.ones(8), 4), torch.zeros(8))          # equal rewards: no signal


def test_beta_zero_limit_and_reinforce_gradient():
    logps, old, ref, adv, mask = _inputs(2)
    base, kl0, _ = grpo_loss(logps, old, None, adv, mask, beta=0.0)
    assert torch.equal(kl0, torch.zeros_like(logps))
    # beta -> 0: the KL term's contribution vanishes linearly
    small, _, _ = grpo_loss(logps, old, ref, adv, mask, beta=1e-9)
    assert abs(float(small) - float(base)) < 1e-8
    # the reference equal to the policy: k3 is exactly 0, whatever beta
    same, kl, _ = grpo_loss(logps, old, logps.clone(), adv, mask, beta=0.5)
    assert float(kl.abs().max()) == 0.0 and abs(float(same) - float(base)) < 1e-12
    assert float(k3_kl(logps, ref).min()) >= 0.0
    # one pass over the buffer (pi == pi_old): the gradient is REINFORCE with the group-mean baseline
    lp = old.clone().requires_grad_(True)
    loss, _, _ = grpo_loss(lp, old, None, adv, mask, beta=0.0)
    (g1,) = torch.autograd.grad(loss, lp)
    lp2 = old.clone().requires_grad_(True)
    pg = (-(adv[:, None] * lp2 * mask).sum(-1) / mask.sum(-1)).mean()
    (g2,) = torch.autograd.grad(pg, lp2)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_bad_loss_type_and_missing_reference():
    logps, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match="loss_type must be grpo, dr_grpo or dapo"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="beta != 0 needs ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="needs max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
