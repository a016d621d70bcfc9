"""Offline preference losses against trl 1.16 on the same inputs, and their invariants.

How trl is called: trl 1.16 has no standalone DPO/KTO loss function, so its trainers' own loss methods
(``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``) run unchanged on a minimal ``self`` (the
attributes they read) with ``precompute_ref_log_probs`` semantics (reference log-probs in the batch) and a
stand-in model whose per-token log-probs are fixed seeded tensors: the loss arithmetic is trl's own code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmstack.align import dpo_loss, kto_loss

trl = pytest.importorskip("trl")


class _Acc:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


class _FixedLogps(torch.nn.Module):
    """Returns the per-token log-probs of row ``input_ids[:, 0]`` of a fixed table (what trl's fused LM head
    would compute), plus the metric tensors trl logs."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        lp = self.table[input_ids[:, 0]]
        mask = (labels[:, 1:] != -100).float()
        lp = lp * mask
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), log_sum_sq_probs=z)


def _trl_self(**kw):
    base = dict(accelerator=_Acc(), model=SimpleNamespace(training=True), ld_alpha=None, precompute_ref_logps=True,
                f_divergence_type="reverse_kl", use_weighting=False, aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
                loss_weights=[1.0])
    return SimpleNamespace(**(base | kw))


def _pairs(b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    # row r of the table: per-token log-probs of sequence r (chosen rows 0..b-1, rejected b..2b-1)
    table = -torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(2, t - 1, (2 * b,), generator=g)
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion[i, t - n:] = 1                       # prompt first, then n completion tokens
    ids = torch.arange(2 * b).unsqueeze(1).repeat(1, t)  # column 0 names the table row
    ref = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 10
    logps = (table * completion[:, 1:]).sum(1)
    return table, ids, completion, ref, logps, completion[:, 1:].sum(1).double()


def _trl_dpo(loss_type, beta, eps, table, ids, completion, ref):
    from trl import DPOTrainer

    b = ids.shape[0] // 2
    me = _trl_self(loss_types=[loss_type], beta=beta, label_smoothing=eps)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
              "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    loss = DPOTrainer._compute_loss(me, _FixedLogps(table), inputs, False)
    return loss, me._metrics["train"]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1), ("robust", 0.3)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(loss_type, eps, beta):
    table, ids, completion, ref, logps, lens = _pairs()
    want, metrics = _trl_dpo(loss_type, beta, eps, table, ids, completion, ref)
    b = ids.shape[0] // 2
    if loss_type == "ipo":   # trl's IPO averages the log-ratios over each completion's tokens
        losses, cr, rr = dpo_loss(logps[:b] / lens[:b], logps[b:] / lens[b:], ref[:b] / lens[:b], ref[b:] / lens[b:],
                                  beta=beta, loss_type="ipo")
    else:
        losses, cr, rr = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta, loss_type=loss_type,
                                  label_smoothing=eps)
        assert abs(cr.mean().item() - metrics["rewards/chosen"][-1]) < 1e-6
        assert abs(rr.mean().item() - metrics["rewards/rejected"][-1]) < 1e-6
        assert abs((cr > rr).double().mean().item() - metrics["rewards/accuracies"][-1]) < 1e-6
    assert abs(losses.mean().item() - want.item()) < 1e-6


def test_label_smoothing_is_conservative_dpo():
    """cDPO: the expected sigmoid loss under a label flipped with probability eps (trl 0.x's ``sigmoid``; trl 1.16's
    ``sigmoid`` ignores ``label_smoothing``, so at eps=0 the two agree, checked above)."""
    table, ids, completion, ref, logps, _ = _pairs(seed=3)
    b = ids.shape[0] // 2
    eps, beta = 0.2, 0.3
    smooth, _, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta, label_smoothing=eps)
    clean, _, _ = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta)
    flipped, _, _ = dpo_loss(logps[b:], logps[:b], ref[b:], ref[:b], beta=beta)
    assert torch.allclose(smooth, (1 - eps) * clean + eps * flipped, atol=1e-12)
    trl_sigmoid, _ = _trl_dpo("sigmoid", beta, eps, table, ids, completion, ref)
    assert abs(trl_sigmoid.item() - clean.mean().item()) < 1e-6


@pytest.mark.parametrize("dw,uw", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_matches_trl(dw, uw):
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(1)
    n, t = 8, 7
    label = torch.tensor([True, False, True, True, False, False, True, False])
    table = -torch.rand(2 * n, t - 1, generator=g, dtype=torch.float64) * 2    # rows n.. are the KL sequences
    completion = torch.zeros(n, t, dtype=torch.long)
    completion[:, 3:] = 1
    ids = torch.arange(n).unsqueeze(1).repeat(1, t)
    kl_ids = ids + n
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 8
    ref_kl = -torch.rand(n, generator=g, dtype=torch.float64) * 8
    me = _trl_self(calculate_KL=True, loss_type="kto", beta=0.2, desirable_weight=dw, undesirable_weight=uw)
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": completion,
             "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    want = KTOTrainer._compute_loss(me, _FixedLogps(table), batch, False)
    logps = (table[:n] * completion[:, 1:]).sum(1)
    kl_logps = (table[n:] * completion[:, 1:]).sum(1)
    losses, cr, rr, kl = kto_loss(logps[label], logps[~label], kl_logps, ref[label], ref[~label], ref_kl,
                                  beta=0.2, desirable_weight=dw, undesirable_weight=uw)
    assert abs(losses.nanmean().item() - want.item()) < 1e-6
    assert abs(kl.item() - me._metrics["train"]["kl"][-1]) < 1e-6
    assert abs(cr.mean().item() - me._metrics["train"]["rewards/chosen"][-1]) < 1e-6


def test_dpo_at_init_is_ln2_and_rewards_zero():
    lp = torch.randn(16, dtype=torch.float64) * 20 - 50
    lr = torch.randn(16, dtype=torch.float64) * 20 - 50
    losses, cr, rr = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.37)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(cr, torch.zeros_like(cr)) and torch.equal(rr, torch.zeros_like(rr))


def test_beta_to_zero_limit():
    """(loss - ln 2) / beta -> -delta / 2 (DPO: the weighting sigma(-beta delta) -> 1/2 goes), and KTO's losses
    -> weight / 2 with gradient -+ beta * weight / 4 per unit log-ratio."""
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(10, generator=g, dtype=torch.float64) for _ in range(4))
    delta = (pc - rc) - (pr - rr)
    for beta in (1e-3, 1e-5):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
        assert torch.allclose((losses - math.log(2)) / beta, -delta / 2, atol=beta * delta.abs().max() ** 2)
    h = torch.randn(4, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(4, dtype=torch.float64)
    beta = 1e-6
    losses, *_ = kto_loss(h, z[:0], z, z, z[:0], z, beta=beta, desirable_weight=2.0)
    assert torch.allclose(losses, torch.full_like(losses, 1.0), atol=1e-6)
    losses.sum().backward()
    assert torch.allclose(h.grad, torch.full_like(h, -beta * 2.0 / 4), rtol=1e-4)


def test_ipo_minimum_is_the_target_margin():
    z = torch.zeros(1, dtype=torch.float64)
    beta = 0.25
    losses, _, _ = dpo_loss(z + 1 / (2 * beta), z, z, z, beta=beta, loss_type="ipo")
    assert losses.item() == 0.0


def test_unknown_loss_type_names_the_field():
    from lmstack.errors import ConfigError

    z = torch.zeros(2)
    with pytest.raises(ConfigError, match="loss_type: must be one of sigmoid, ipo, robust"):
        dpo_loss(z, z, z, z, loss_type="hinge")


def test_simpo_and_orpo_match_trl(monkeypatch):
    """Reference-free losses against trl's experimental CPO (simpo) and ORPO loss methods, on a minimal self."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from lmstack.align.dpo import orpo_odds_ratio, simpo_loss

    g = torch.Generator().manual_seed(7)
    c = -torch.rand(12, generator=g, dtype=torch.float64) * 3       # token-averaged log-probs
    r = -torch.rand(12, generator=g, dtype=torch.float64) * 3
    for eps in (0.0, 0.1):
        me = SimpleNamespace(alpha=0.0, accelerator=_Acc(), loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                             label_smoothing=eps)
        want, wc, wr = CPOTrainer.cpo_loss(me, c, r)
        got, gc, gr = simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=eps)
        assert torch.allclose(got, want, atol=1e-6) and torch.allclose(gc, wc) and torch.allclose(gr, wr)
    me = SimpleNamespace(beta=0.25, accelerator=_Acc())
    want = ORPOTrainer.odds_ratio_loss(me, c, r)[0]
    assert torch.allclose(orpo_odds_ratio(c, r, beta=0.25)[0], want, atol=1e-6)
