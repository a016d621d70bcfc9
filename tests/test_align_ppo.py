"""PPO: the policy and value losses, GAE and whitening against trl's PPOTrainer on the same inputs, the
documented limits (one epoch at ratio 1 = the policy-gradient estimate; kl_coef 0 = the score alone), the
value head by module swap, and a run on the one trainer (full and LoRA).

The trl reference: trl 1.16 (installed) no longer ships PPO (PPOTrainer was removed after 0.2x); the
reference below is trl 0.19.1's ``trl/trainer/ppo_trainer.py`` (the loss block of ``train()`` and the GAE
loop) and ``trl/core.py`` (``masked_mean``, ``masked_var``, ``masked_whiten``), restated operation for
operation on response-aligned, right-padded tensors. Where trl puts the score one position past the last
response token when that position exists (its ``sequence_lengths_p1``), we put it on the last response token
(the stop token, which is a response token here); the GAE comparison therefore feeds both the same rewards.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.align import ppo_loss
from lmstack.align.ppo import ActorCritic, gae, token_rewards, value_model, whiten

# -------------------------------------------------------------------- trl 0.19.1's computations, restated


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_var(values, mask):
    mean = _trl_masked_mean(values, mask)
    variance = _trl_masked_mean((values - mean) ** 2, mask)
    n = mask.sum()
    return variance * (n / (n - 1))


def _trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = _trl_masked_mean(values, mask), _trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _trl_gae(rewards, values, gamma, lam):
    lastgaelam = 0
    reversed_ = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], axis=1)
    return advantages, advantages + values


def _trl_loss(new_logprobs, logprobs, advantage, vpred, values, returns, mask, cliprange, cliprange_value, vf_coef):
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantage * ratio
    pg_losses2 = -advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _trl_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss


def _batch(seed=0, b=5, t=8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.float64)
    for i, n in enumerate([8, 3, 6, 1, 5]):
        mask[i, n:] = 0
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return {"mask": mask, "old": old * mask, "new": (old + 0.4 * r(b, t)) * mask, "ref": (old + 0.2 * r(b, t)) * mask,
                "values": r(b, t) * mask, "vpred": r(b, t) * mask, "returns": r(b, t) * mask, "adv": r(b, t) * mask,
                "scores": r(b)}


def test_ppo_loss_matches_trl():
    d = _batch()
    for clip, clip_v, vf in [(0.2, 0.2, 0.1), (0.1, 0.5, 1.0)]:
        want = _trl_loss(d["new"], d["old"], d["adv"], d["vpred"], d["values"], d["returns"], d["mask"],
                         clip, clip_v, vf)
        got = ppo_loss(d["new"], d["old"], d["adv"], d["vpred"], d["values"], d["returns"], d["mask"],
                       clip_range=clip, clip_range_value=clip_v, vf_coef=vf)
        for w, g in zip(want, got[:3]):
            assert abs(float(w) - float(g)) < 1e-6
        assert float((got[3].double() * d["mask"]).sum()) > 0        # the clip was exercised


def test_gae_and_whitening_match_trl():
    d = _batch(1)
    m = d["mask"]
    rewards, kl = token_rewards(d["scores"], d["old"], d["ref"], m.bool(), kl_coef=0.05)
    assert torch.allclose(kl, (d["old"] - d["ref"]) * m)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5)]:
        want_adv, want_ret = _trl_gae(rewards, d["values"], gamma, lam)
        adv, ret = gae(rewards, d["values"], m, gamma, lam)
        assert torch.allclose(adv, want_adv * m, atol=1e-10) and torch.allclose(ret, want_ret * m, atol=1e-10)
        assert torch.allclose(whiten(adv, m) * m, _trl_masked_whiten(want_adv, m) * m, atol=1e-10)
    assert torch.allclose(whiten(rewards, m, shift_mean=False) * m,
                          _trl_masked_whiten(rewards, m, shift_mean=False) * m, atol=1e-10)


def test_kl_coef_zero_rewards_are_the_score_on_the_last_token():
    d = _batch(2)
    m = d["mask"].bool()
    rewards, _ = token_rewards(d["scores"], d["old"], d["ref"], m, kl_coef=0.0)
    last = m.sum(1) - 1
    want = torch.zeros_like(rewards)
    want[torch.arange(5), last] = d["scores"]
    assert torch.equal(rewards, want)
    with_kl, kl = token_rewards(d["scores"], d["old"], d["ref"], m, kl_coef=0.3)
    assert torch.allclose(with_kl, want - 0.3 * kl)


def test_one_epoch_ratio_one_is_the_policy_gradient():
    d = _batch(3)
    m = d["mask"]
    lp = d["old"].clone().requires_grad_(True)
    loss, pg, vf, clipped = ppo_loss(lp, d["old"], d["adv"], d["values"], d["values"], d["returns"], m, vf_coef=0.0)
    assert not clipped.any() and float(vf) >= 0
    (g1,) = torch.autograd.grad(loss, lp)
    lp2 = d["old"].clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(-(d["adv"] * lp2 * m).sum() / m.sum(), lp2)
    assert torch.allclose(g1, g2, atol=1e-12)
    assert abs(float(pg.detach()) + float((d["adv"] * m).sum() / m.sum())) < 1e-12


def test_value_model_is_a_module_swap_on_a_copy():
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    policy = build_model(preset("tiny", vocab_size=64, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    v = value_model(policy)
    x = torch.randint(0, 64, (3, 10))
    assert v(x).shape == (3, 10, 1) and torch.equal(v(x), torch.zeros(3, 10, 1))     # zero-initialised head
    assert policy(x).shape == (3, 10, 64)
    assert type(v.lm_head) is torch.nn.Linear and v.lm_head.out_features == 1
    # a copy: training the value model leaves the policy's weights alone
    opt = torch.optim.SGD(v.parameters(), lr=0.1)
    v(x).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], t) for k, t in policy.state_dict().items())
    ac = ActorCritic(policy, v)
    assert ac.num_parameters() == policy.num_parameters() + v.num_parameters()


# ------------------------------------------------------------------------------------------- a run (tiny)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from lmstack.align.rl_data import arithmetic_items
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    items = arithmetic_items(30, split="train", max_operand=9)
    tok = train_bpe([it["question"] + " " + it["solution"] for it in items], 300)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ppo_base")
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=96)),
         folder)
    tok.save(folder)
    return folder


def digits(responses, items):
    return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ppo_run_trains_policy_and_value_and_keeps_the_reference(tiny_base, tmp_path, method):
    import math

    from safetensors.torch import load_file

    from lmstack.align.online import run_online
    from lmstack.align.rl_config import OnlineConfig
    from lmstack.config import from_dict
    from lmstack.train.trainer import read_metrics

    run = tmp_path / method
    cfg = from_dict(OnlineConfig, {
        "algo": "ppo", "run_dir": str(run), "base": str(tiny_base), "method": method, "steps": 4,
        "minibatch_size": 4, "ppo_epochs": 2, "lr": 1e-3, "lora": {"r": 4},
        "rollout": {"prompts": 4, "num_samples": 2, "max_new_tokens": 8}, "ppo": {"kl_coef": 0.1},
        "data": {"arithmetic": {"max_operand": 9, "train_items": 16, "heldout_items": 4}, "eval_items": 4}})
    res = run_online(cfg, extra_rewards=[(digits, 1.0)])
    assert res["rollouts"] == 1 and res["reference_unchanged"] is True
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "pg_loss", "vf_loss", "entropy", "rollout_kl"))
    value = load_file(str(run / "value.safetensors"))
    assert value["lm_head.weight"].shape == (1, 64) and float(value["lm_head.weight"].abs().sum()) > 0  # trained
    assert (run / ("model.safetensors" if method == "full" else "adapter.safetensors")).is_file()
