"""Knowledge distillation losses: parity with the formula written out directly, and a student that learns."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.train.objectives import kd_loss, make_distill_loss_fn


def _direct(student, teacher, targets, T, alpha, kind):
    total_kl, n = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            if targets[b, i] == -100:
                continue
            p = torch.softmax(teacher[b, i].double() / T, -1)
            q = torch.softmax(student[b, i].double() / T, -1)
            total_kl += float((p * (p / q).log()).sum() if kind == "forward" else (q * (q / p).log()).sum())
            n += 1
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, student.shape[-1]).double(), targets.reshape(-1),
                                           ignore_index=-100)
    return alpha * T * T * total_kl / n + (1 - alpha) * float(ce)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.9)])
def test_kd_loss_equals_the_formula(kind, T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, :2] = -100
    assert math.isclose(float(kd_loss(s, t, y, T, alpha, kind)), _direct(s, t, y, T, alpha, kind), rel_tol=1e-5)


def test_kd_loss_is_zero_when_the_student_is_the_teacher():
    t = torch.randn(1, 4, 7)
    assert float(kd_loss(t, t, torch.zeros(1, 4, dtype=torch.long), 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_a_distilled_student_moves_toward_its_teacher():
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    teacher = build_model(preset("tiny", vocab_size=50, d_model=32, n_layer=2, n_head=4))
    student = build_model(preset("tiny", vocab_size=50, d_model=32, n_layer=1, n_head=4))
    loss_fn = make_distill_loss_fn(teacher, temperature=1.0, alpha=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 16))
    first = None
    for _ in range(60):
        loss = loss_fn(student, x, x)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    assert all(p.grad is None for p in teacher.parameters())
