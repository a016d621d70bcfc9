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


# ---------------------------------------------------------------------------------------------------------
# cached top-k teacher logits


def test_topk_kd_with_the_whole_vocabulary_is_kd_loss():
    from lmstack.train.objectives import kd_loss_topk

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 13, generator=g), torch.randn(2, 6, 13, generator=g) * 3
    y = torch.randint(0, 13, (2, 6), generator=g)
    y[1, :3] = -100
    values, indices = t.topk(13, dim=-1)                    # every token, in the teacher's order
    for T, alpha in ((1.0, 1.0), (2.0, 0.5)):
        assert float(kd_loss_topk(s, values, indices, y, T, alpha)) == pytest.approx(
            float(kd_loss(s, t, y, T, alpha, "forward")), rel=1e-6)


def test_topk_kd_is_the_kl_to_the_renormalised_top_k():
    from lmstack.train.objectives import kd_loss_topk

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(1, 3, 10, generator=g), torch.randn(1, 3, 10, generator=g) * 2
    y = torch.zeros(1, 3, dtype=torch.long)
    values, indices = t.topk(4, dim=-1)
    T, total = 2.0, 0.0
    for i in range(3):
        p = torch.softmax(values[0, i].double() / T, -1)     # the teacher on its top 4 only
        logq = torch.log_softmax(s[0, i].double() / T, -1)[indices[0, i]]
        total += float((p * (p.log() - logq)).sum())
    assert float(kd_loss_topk(s, values, indices, y, T, 1.0)) == pytest.approx(T * T * total / 3, rel=1e-6)
    assert float(kd_loss_topk(s, values, indices, y, T, 1.0)) != pytest.approx(float(kd_loss(s, t, y, T, 1.0)))


def test_the_cache_runs_the_teacher_once_per_block_and_matches_on_the_fly():
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    teacher = build_model(preset("tiny", vocab_size=50, d_model=32, n_layer=2, n_head=4))
    student = build_model(preset("tiny", vocab_size=50, d_model=32, n_layer=1, n_head=4))
    calls = []
    teacher.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    cached = make_distill_loss_fn(teacher, 2.0, 0.5, cache_topk=50)
    direct = make_distill_loss_fn(teacher, 2.0, 0.5)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 50, (6, 12), generator=g)
    teacher_rows = []
    for order in ([0, 1, 2], [3, 4, 5], [2, 0, 4], [5, 1, 3]):   # the second pass sees only cached blocks
        x = blocks[order]
        n_before = len(calls)
        a = cached(student, x, x)
        teacher_rows.append(sum(calls[n_before:]))
        b = direct(student, x, x)
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert teacher_rows == [3, 3, 0, 0]
    assert (cached.cache.misses, cached.cache.hits) == (6, 6)


def test_cache_with_reverse_kl_is_a_config_error():
    from lmstack.errors import ConfigError
    from lmstack.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^kd_cache_topk: the top-k cache serves kd_kind = 'forward' only"):
        TrainConfig(objective="distill", teacher="t", kd_kind="reverse", kd_cache_topk=8)


def test_prune_then_distill_through_the_trainer_with_and_without_the_cache(tmp_path):
    """objective distill + init_from (a pruned teacher as the student's start) + kd_cache_topk = the vocabulary:
    the same losses as the teacher run every step."""
    import lmstack.model as lm
    from lmstack.compress.prune_structured import prune_structured
    from lmstack.model import build_model, preset
    from lmstack.train.config import TrainConfig
    from lmstack.train.data import byte_tokenizer
    from lmstack.train.trainer import pretrain

    torch.manual_seed(0)
    teacher = build_model(preset("tiny", vocab_size=257, d_model=32, n_layer=3, n_head=4, max_seq_len=64))
    lm.save(teacher, tmp_path / "t")
    byte_tokenizer().save(tmp_path / "t")
    student, _ = prune_structured(teacher, layers=2)
    lm.save(student, tmp_path / "s")
    byte_tokenizer().save(tmp_path / "s")
    (tmp_path / "train.txt").write_text("the cat sat on the mat. " * 40)
    (tmp_path / "valid.txt").write_text("the dog sat on the log. " * 10)
    summaries = []
    for k in (0, 257):
        cfg = TrainConfig(run_dir=str(tmp_path / f"run{k}"), objective="distill", teacher=str(tmp_path / "t"),
                          init_from=str(tmp_path / "s"), model={}, kd_cache_topk=k, steps=6, batch_size=2,
                          dtype="fp32", threads=1, eval_every=0, ckpt_every=0, sample_prompts=[], log_every=1,
                          data={"train": [str(tmp_path / "train.txt")], "valid": [str(tmp_path / "valid.txt")],
                                "seq_len": 16},
                          optim={"lr": 1e-3, "warmup_steps": 1})
        summaries.append(pretrain(cfg))
    assert summaries[0]["params_total"] == student.num_parameters()
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-5)
    assert summaries[1]["val_loss"] == pytest.approx(summaries[0]["val_loss"], rel=1e-5)
