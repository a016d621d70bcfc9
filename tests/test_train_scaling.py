"""The Chinchilla fit recovers the law that generated the losses; the compute-optimal split is optimal."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lmstack.errors import DataError
from lmstack.train.scaling import ChinchillaFit, fit_chinchilla, fit_report

# Hoffmann et al. 2022, approach 3 (their eq. 10)
TRUE = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
GRID = list(itertools.product([1e7, 3e7, 1e8, 3e8, 1e9], [1e8, 1e9, 1e10, 1e11]))


def _fit(noise: float) -> ChinchillaFit:
    rng = random.Random(0)
    losses = [TRUE.loss(n, d) * (1 + rng.gauss(0, noise)) for n, d in GRID]
    return fit_chinchilla([n for n, _ in GRID], [d for _, d in GRID], losses, n_starts=8)


def test_fit_recovers_known_parameters_from_exact_losses():
    fit = _fit(0.0)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name


def test_fit_is_close_with_noisy_losses():
    fit = _fit(0.002)  # 0.2% noise on every loss
    assert fit.alpha == pytest.approx(TRUE.alpha, abs=0.02) and fit.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert fit.E == pytest.approx(TRUE.E, abs=0.05)
    n_true, _ = TRUE.compute_optimal(1e21)
    n_fit, _ = fit.compute_optimal(1e21)
    assert n_fit == pytest.approx(n_true, rel=0.25)


def test_compute_optimal_split_spends_the_budget_and_minimises_the_loss():
    c = 5.76e23  # Gopher's budget
    n, d = TRUE.compute_optimal(c)
    assert 6 * n * d == pytest.approx(c)
    best = TRUE.loss(n, d)
    for f in (0.8, 0.9, 1.1, 1.25):  # any other split of the same budget is worse
        assert TRUE.loss(n * f, c / (6 * n * f)) > best
    assert 2e10 < n < 6e10  # the paper's ~40B-parameter answer for this budget (approach 3)


def test_fit_needs_five_runs():
    with pytest.raises(DataError, match="at least 5 runs"):
        fit_chinchilla([1e6] * 4, [1e7] * 4, [3.0] * 4)


def test_scaling_fit_cli_reports_the_optimum(tmp_path, capsys, monkeypatch):
    import lmstack.cli

    if "lmstack.train.cli" not in lmstack.cli.LAYER_CLIS:
        monkeypatch.setattr(lmstack.cli, "LAYER_CLIS", [*lmstack.cli.LAYER_CLIS, "lmstack.train.cli"])
    rows = [{"params": n, "tokens": d, "loss": TRUE.loss(n, d)} for n, d in GRID]
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lmstack.cli.main(["scaling", "fit", str(tmp_path), "--budget", "1e21"]) == 0
    out = capsys.readouterr().out
    assert "| 1.00e+21 |" in out and "L(N, D) = 1.690" in out
    assert json.loads((tmp_path / "fit.json").read_text())["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert (tmp_path / "fit.png").is_file()
    _, report = fit_report(rows, [1e21])
    assert report.splitlines()[0].startswith("L(N, D) = 1.690")


def test_sweep_trains_the_grid_and_resumes(tmp_path):
    from lmstack.data.pack import pack_texts
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.scaling import SweepConfig, run_sweep
    from lmstack.train.trainer import byte_tokenizer

    rng = random.Random(0)
    words = "scaling laws relate loss to parameters and tokens".split()
    pack_texts([" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)], byte_tokenizer(),
               tmp_path / "shards", workers=1)
    train = TrainConfig(batch_size=4, log_every=1, eval_every=0, eval_batches=2, ckpt_every=0, sample_prompts=[],
                        dtype="fp32", peak_tflops=1.0, model={"preset": "tiny", "n_layer": 1},
                        optim=OptimConfig(lr=1e-2, warmup_steps=1),
                        data=DataConfig(train=[str(tmp_path / "shards")], seq_len=16, workers=1))
    cfg = SweepConfig(run_dir=str(tmp_path / "sweep"), train=train, tokens=[128, 256, 384],
                      sizes=[{"d_model": 16, "n_head": 2}, {"d_model": 32, "n_head": 2}])
    rows = run_sweep(cfg)
    assert len(rows) == 6 and {r["tokens"] for r in rows} == {128, 256, 384}
    assert rows[0]["params"] < rows[-1]["params"] and all(r["loss"] > 0 for r in rows)
    assert run_sweep(cfg) == rows  # finished runs are not trained again
