"""Mixture of experts: top-k routing with capacity, the auxiliary losses, and a tiny MoE model that learns."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import KVCache, ModelConfig, build_model
from lmstack.model.layers import MoE, load_balancing_loss, route, router_z_loss


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, max_seq_len=64, n_experts=4, moe_top_k=2,
                pos="rope", norm="rmsnorm", ffn="swiglu", activation="silu", bias=False)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("top_k, capacity", [(1, 10), (2, 20), (2, 8), (3, None)])
def test_routing_respects_top_k_and_capacity(top_k, capacity):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(64, 4, generator=gen) * 2
    logits[:, 0] += 1.5                                            # an over-subscribed expert
    weights, experts, keep = route(logits, top_k, capacity)
    assert experts.shape == weights.shape == keep.shape == (64, top_k)
    for row in experts:                                           # k distinct experts per token
        assert len(set(row.tolist())) == top_k
    expected = logits.topk(top_k, dim=-1).indices
    assert torch.equal(experts, expected)
    if top_k > 1:
        torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    if capacity is None:
        assert keep.all()
        return
    for e in range(4):
        served = ((experts == e) & keep).sum().item()
        wanted = (experts == e).sum().item()
        assert served == min(wanted, capacity)                    # full up to capacity, never beyond
        first = ((experts[:, 0] == e)).sum().item()
        # first choices are served before any second choice, in token order
        assert ((experts[:, 0] == e) & keep[:, 0]).sum().item() == min(first, capacity)
        idx = torch.where(experts[:, 0] == e)[0]
        kept_first = keep[idx, 0]
        assert torch.equal(kept_first, torch.arange(len(idx)) < capacity)


def test_load_balancing_loss_is_lowest_for_uniform_routing():
    n, e = 64, 4
    uniform_probs = torch.full((n, e), 1 / e)
    balanced = torch.arange(n)[:, None] % e                       # each expert gets n/e tokens
    assert load_balancing_loss(uniform_probs, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, 1, dtype=torch.long)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(n, e)
    assert load_balancing_loss(probs, collapsed).item() == pytest.approx(e * 0.97)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 1.0, 3.0):
        logits = torch.randn(n, e, generator=gen) * scale
        p = logits.softmax(-1)
        assert load_balancing_loss(p, p.topk(2, -1).indices).item() > 1.0
    assert router_z_loss(torch.zeros(n, e)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_moe_layer_drops_overflow_in_training_only():
    cfg = moe_cfg(moe_capacity_factor=0.5)
    layer = MoE(cfg)
    x = torch.randn(2, 16, 32)
    layer.train()
    layer(x)
    assert layer.aux["dropped"].item() > 0
    layer.eval()
    layer(x)
    assert layer.aux["dropped"].item() == 0


def test_tiny_moe_model_trains_and_reports_aux_losses():
    torch.manual_seed(0)
    cfg = moe_cfg(moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 61, (4, 17))
    losses = []
    for _ in range(40):
        logits, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    aux = model.aux_losses
    assert set(aux) == {"load_balance", "z", "dropped"}
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + 0.01 * aux["load_balance"] + 0.001 * aux["z"])
    assert model.blocks[0].ffn.router.weight.grad is not None


def test_moe_kv_cache_decode_matches_full_forward():
    model = build_model(moe_cfg()).eval()
    x = torch.randint(0, 61, (2, 10))
    cache = KVCache.for_model(model, 2, 16)
    steps = [model(x[:, :4], kv_cache=cache)] + [model(x[:, i:i + 1], kv_cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), model(x), atol=1e-5, rtol=0)


def test_moe_flops_count_only_active_experts():
    dense = moe_cfg(n_experts=0)
    moe = moe_cfg(n_experts=8, moe_top_k=2)
    ffn = 3 * 32 * dense.d_ff
    assert moe.active_matmul_params() - dense.active_matmul_params() == 2 * (ffn + 32 * 8)


def test_moe_encoder_adds_aux_losses_to_its_loss():
    torch.manual_seed(0)
    cfg = moe_cfg(arch="encoder", mlm_head=True, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1)
    model = build_model(cfg)
    x = torch.randint(0, 61, (2, 9))
    targets = torch.full_like(x, -100)
    targets[:, ::3] = x[:, ::3]
    logits, loss = model(x, targets=targets)
    aux = model.aux_losses
    assert set(aux) == {"load_balance", "z", "dropped"} and aux["load_balance"].item() > 0
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    expected = plain + 0.5 * aux["load_balance"] + 0.1 * aux["z"]
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()  # the router learns from the balancing term
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_moe_seq2seq_averages_encoder_and_decoder_aux_losses():
    torch.manual_seed(0)
    cfg = moe_cfg(arch="encoder-decoder", moe_aux_loss_coef=0.5, moe_z_loss_coef=0.0)
    model = build_model(cfg)
    src, dec = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 5))
    _, loss = model(src, dec, targets=dec)
    enc_lb = [b.ffn.aux["load_balance"] for b in model.encoder.blocks]
    dec_lb = [b.ffn.aux["load_balance"] for b in model.decoder.blocks]
    assert torch.allclose(model.aux_losses["load_balance"], torch.stack(enc_lb + dec_lb).mean())
    loss.backward()
    assert model.encoder.blocks[0].ffn.router.weight.grad.abs().sum() > 0
