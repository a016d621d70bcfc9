"""PPO for language models (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; the RLHF recipe
of Ziegler et al. 2019 and Ouyang et al. 2022; the "N+ implementation details" of Huang et al. 2024), the
way ``trl``'s PPOTrainer computes it.

Per response token ``t`` of sample ``i`` (positions where ``mask`` is 1):

- reward: a per-token KL penalty to the reference, plus the sequence's score on its last token::

      r_it = -kl_coef * (log pi_old(o_it) - log pi_ref(o_it))  +  [t = last] * score_i

  optionally whitened (divided by its std over the batch's tokens, mean kept: ``whiten_rewards``);
- GAE (Schulman et al. 2016) with the value head's ``V_it`` (the value of the state before token ``t``)::

      delta_it = r_it + gamma * V_i,t+1 - V_it        (V after the last token is 0)
      A_it     = delta_it + gamma * lam * A_i,t+1       returns R_it = A_it + V_it

  then ``A`` is whitened over the batch's tokens (mean 0, std 1);
- loss, over several epochs of minibatches of each rollout batch (``ppo_epochs``)::

      rho      = pi(o_it) / pi_old(o_it)
      L_pg     = mean_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
      V_clip   = V_old + clip(V - V_old, -eps_v, eps_v)
      L_vf     = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
      L        = L_pg + vf_coef * L_vf

With one epoch over the batch (``rho = 1``) ``L_pg``'s gradient is the policy-gradient estimate
``-mean_t A_it grad log pi(o_it)``; with ``kl_coef = 0`` the reward is the score alone. The value head is a
copy of the policy whose ``lm_head`` is swapped (:func:`lmstack.model.swap.set_module`) for a (d_model -> 1)
linear: the same forward, no fork of the model code. A sample whose score is NaN (a failing reward) is
dropped from the mask: no gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmstack.align.grpo import entropy_of, masked_mean
from lmstack.align.logps import token_logps


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (var with Bessel's correction);
    ``shift_mean=False`` adds the mean back (scale only)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    var = var * n / (n - 1) if n > 1 else var
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T): ``-kl_coef * (old - ref)`` on response tokens, ``score`` added on each row's
    last response token; and the per-token KL (k1) itself."""
    m = mask.to(old_logps.dtype)
    kl = (old_logps - ref_logps) * m
    rewards = -kl_coef * kl
    has = mask.any(1)
    last = (mask.shape[1] - 1) - torch.flip(mask.to(torch.long), [1]).argmax(1)   # last masked position per row
    rows = torch.arange(mask.shape[0])[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (B, T) over the masked (response) positions."""
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    t_len = values.shape[1]
    last = torch.zeros_like(values[:, 0])
    out = torch.zeros_like(values)
    for t in reversed(range(t_len)):
        next_v = v[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        out[:, t] = last
    advantages = out * m
    return advantages, (advantages + v)


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_range: float = 0.2,
             clip_range_value: float = 0.2, vf_coef: float = 0.1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PPO loss (module docstring); all inputs (B, T), ``mask`` 1 on response tokens.

    Returns ``(loss, pg_loss, vf_loss, clipped)``: ``loss = pg_loss + vf_coef * vf_loss`` (scalars) and where
    the policy clip was active (B, T) bool.
    """
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg2 > pg1


# ----------------------------------------------------------------------------------------------------------
# the value model and the trained pair


def value_model(policy: nn.Module) -> nn.Module:
    """A copy of ``policy`` whose ``lm_head`` is a (d_model -> 1) linear (zero-initialised: V = 0 at start):
    ``value_model(x)`` is (B, T, 1), the value of each prefix."""
    from lmstack.model.swap import set_module

    v = copy.deepcopy(policy)
    head = nn.Linear(policy.config.d_model, 1, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    dev = next(policy.parameters()).device
    set_module(v, "lm_head", head.to(dev))
    if getattr(v, "lm_head_bias", None) is not None:
        v.lm_head_bias = None                 # the vocabulary bias has no meaning for one output
    for p in head.parameters():
        p.requires_grad_(True)
    return v


class ActorCritic(nn.Module):
    """The policy and its value model, trained together by one optimizer (what the trainer's Task holds)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.policy(input_ids, **kw)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return (self.policy.num_parameters(exclude_embeddings=exclude_embeddings)
                + self.value.num_parameters(exclude_embeddings=exclude_embeddings))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.policy.flops_per_token(seq_len) + self.value.flops_per_token(seq_len)


@torch.no_grad()
def response_values(value: nn.Module, x: torch.Tensor, mask: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Values (B, T) of the prefixes before each response token (0 elsewhere), eval mode, no gradient."""
    from lmstack.infer.session import eval_mode

    device = next(value.parameters()).device
    out = []
    with eval_mode(value):
        for s in range(0, x.shape[0], batch_size):
            out.append(value(x[s:s + batch_size].to(device))[..., 0].float().cpu())
    return torch.cat(out) * mask.to(torch.float32)


def make_ppo_loss_fn(clip_range: float, clip_range_value: float, vf_coef: float, temperature: float = 1.0):
    """The trainer's ``loss_fn(model, x, y, generator)`` for a PPO minibatch; ``model`` is an :class:`ActorCritic`."""

    def loss_fn(model: nn.Module, x: dict[str, Any], y: Any, generator: Any):
        logits = model.policy(x["input_ids"])
        if temperature != 1.0:            # the sampling distribution the rollouts came from
            logits = logits / temperature
        values = model.value(x["input_ids"])[..., 0].float()
        logps = token_logps(logits, x["labels"])
        mask = x["mask"]
        loss, pg, vf, clipped = ppo_loss(logps, x["old_logps"], x["advantages"], values, x["old_values"],
                                         x["returns"], mask, clip_range=clip_range,
                                         clip_range_value=clip_range_value, vf_coef=vf_coef)
        metrics = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "clip_frac": masked_mean(clipped.float(), mask),
                   "entropy": masked_mean(entropy_of(logits), mask),
                   "value_mean": masked_mean(values.detach(), mask), **x.get("stats", {})}
        return loss, metrics

    return loss_fn
