"""Scaling laws: sweep small models over token budgets, fit the Chinchilla law, pick a compute-optimal size.

The parametric law of Hoffmann et al. ("Training Compute-Optimal Large Language Models", 2022, eq. 2)::

    L(N, D) = E + A / N^alpha + B / D^beta

N parameters, D training tokens. As in the paper (section D.2) the fit minimises a Huber loss
(delta = 1e-3) between the log of the predicted and the observed loss, written with a log-sum-exp so
the optimiser works on a = log A, b = log B, e = log E, and starts L-BFGS from a grid of
initialisations, keeping the best. With training compute C = 6 N D the compute-optimal split is::

    N_opt(C) = G (C/6)^(beta/(alpha+beta)),   D_opt(C) = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

A sweep (:func:`run_sweep`) trains each (model size, token budget) pair with the normal trainer and
writes ``sweep.jsonl`` (one row per run: ``params``, ``tokens``, ``loss``); :func:`fit_chinchilla`
reads those rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import ConfigError, DataError
from lmstack.train.config import TrainConfig


@dataclass
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber: float = 0.0       # the objective at the optimum (sum over points)

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under the budget 6 N D = ``flops``."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (flops / 6.0) ** (b / (a + b))
        return n, flops / (6.0 * n)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def fit_chinchilla(n: list[float], d: list[float], loss: list[float], delta: float = 1e-3,
                   grid: dict[str, list[float]] | None = None, max_iter: int = 200,
                   n_starts: int = 16) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to observed (N, D, loss) triples (see the module docstring)."""
    if not (len(n) == len(d) == len(loss)):
        raise DataError("scaling fit: N, D and loss lists must have the same length")
    if len(n) < 5:
        raise DataError(f"scaling fit: need at least 5 runs to fit 5 parameters, got {len(n)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*n, *d, *loss)):
        raise DataError("scaling fit: params, tokens and loss must be numbers")
    if not all(math.isfinite(v) for v in (*n, *d, *loss)):
        raise DataError("scaling fit: N, D and losses must be finite numbers (a run diverged?)")
    if min(loss) <= 0 or min(n) <= 0 or min(d) <= 0:
        raise DataError("scaling fit: N, D and losses must be positive")
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise DataError(f"scaling fit: the rows need at least 2 different model sizes and 2 different token "
                        f"counts (got {len(set(n))} and {len(set(d))}); with fewer, A/N^alpha and B/D^beta "
                        f"cannot be told apart")
    log_n = torch.tensor(n, dtype=torch.float64).log()
    log_d = torch.tensor(d, dtype=torch.float64).log()
    log_l = torch.tensor(loss, dtype=torch.float64).log()
    grid = grid or {"a": [0.0, 5.0, 10.0, 15.0, 20.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0],
                    "e": [-1.0, -0.5, 0.0, 0.5, 1.0], "alpha": [0.1, 0.3, 0.5], "beta": [0.1, 0.3, 0.5]}

    def objective(x: torch.Tensor) -> torch.Tensor:
        a, b, e, alpha, beta = x
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(log_n)]), dim=0)
        return _huber(pred - log_l, delta).sum()

    best: tuple[float, torch.Tensor] | None = None
    with torch.no_grad():
        starts = [torch.tensor(s, dtype=torch.float64) for s in itertools.product(
            grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])]
        # L-BFGS from every grid point is slow; polish the most promising starts only.
        starts.sort(key=lambda s: objective(s).item())
    for start in starts[:n_starts]:
        x = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(x)
            value.backward()
            return value

        opt.step(closure)
        value = objective(x).item()
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, x.detach().clone())
    if best is None:
        raise DataError("scaling fit: the optimiser did not converge from any start")
    a, b, e, alpha, beta = best[1].tolist()
    return ChinchillaFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, huber=best[0])


# ---------------------------------------------------------------------------------------------------------
# sweep


@dataclass
class SweepConfig:
    """A grid of model sizes x token budgets, each trained with ``train`` (its steps set from the budget)."""

    run_dir: str = "runs/scaling"
    sizes: list[dict[str, Any]] = field(default_factory=lambda: [
        {"d_model": 32, "n_layer": 1, "n_head": 2}, {"d_model": 48, "n_layer": 2, "n_head": 2},
        {"d_model": 64, "n_layer": 2, "n_head": 4}, {"d_model": 96, "n_layer": 3, "n_head": 4}])
    tokens: list[int] = field(default_factory=lambda: [40_000, 80_000, 160_000])
    budgets: list[float] = field(default_factory=lambda: [1e15, 1e18, 1e21])   # FLOPs to report N_opt/D_opt for
    count_embeddings: bool = False     # N excludes embeddings by default (Kaplan et al.): tiny models are mostly vocab
    train: TrainConfig = field(default_factory=lambda: TrainConfig(eval_every=0, ckpt_every=0, eval_batches=10,
                                                                   sample_tokens=1, sample_prompts=[]))

    def __post_init__(self) -> None:
        if not self.sizes or not self.tokens:
            raise ConfigError("sizes and tokens: name at least one model size and one token budget")
        if len(self.sizes) * len(self.tokens) < 5:
            raise ConfigError("sizes x tokens: the fit needs at least 5 runs")
        bad = [t for t in self.tokens if t <= 0]
        if bad:
            raise ConfigError(f"config field 'tokens': token budgets must be > 0, got {bad[0]}")
        bad = [b for b in self.budgets if not math.isfinite(b) or b <= 0]
        if bad:
            raise ConfigError(f"config field 'budgets': FLOP budgets must be finite and > 0, got {bad[0]}")
        if not self.train.data.train:
            raise ConfigError("config field 'train.data.train': give the training text, e.g. --train.data.train "
                              "runs/speedrun/corpus/train.jsonl")
        if len(set(self.tokens)) < 2:
            raise ConfigError("config field 'tokens': the fit needs at least two different token budgets")


def run_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Train every (size, tokens) pair; append a row per finished run to ``RUN/sweep.jsonl`` and return all rows.

    A finished run is skipped when the sweep is run again, so an interrupted sweep resumes.
    """
    from lmstack.config import to_dict
    from lmstack.runs import atomic_write_json, read_jsonl
    from lmstack.train.trainer import pretrain

    from lmstack.runs import remove_if_failed

    root = Path(cfg.run_dir)
    with remove_if_failed(root):  # bad data or tokenizer fails here, and a sweep that never started leaves nothing
        base = _tokenize_once(cfg.train, root)
    atomic_write_json(root / "config.json", to_dict(cfg))
    done = {row["name"]: {k: v for k, v in row.items() if k != "time"} for row in read_jsonl(root / "sweep.jsonl")}
    tokens_per_step = base.batch_size * base.grad_accum * base.data.seq_len
    from lmstack.runs import JsonlLogger

    with JsonlLogger(root / "sweep.jsonl") as log:
        for i, size in enumerate(cfg.sizes):
            for tokens in cfg.tokens:
                name = f"size{i}_tok{tokens}"
                if name in done:
                    continue
                steps = max(1, round(tokens / tokens_per_step))
                train = dataclasses.replace(base, run_dir=str(root / name), steps=steps,
                                            model={**base.model, **size},
                                            optim=dataclasses.replace(base.optim,
                                                                      warmup_steps=min(base.optim.warmup_steps,
                                                                                       steps // 5)))
                result = pretrain(train)
                row = {"name": name, "size": size, "params": result["params_total" if cfg.count_embeddings
                                                                    else "params_non_embedding"],
                       "tokens": steps * tokens_per_step, "loss": result["val_loss"], "steps": steps,
                       "flops": result["flops"]}
                log.log(row)
                done[name] = row
    return list(done.values())


def _tokenize_once(train: TrainConfig, root: Path) -> TrainConfig:
    """Text inputs are tokenized into ``root/data`` once for all runs of the sweep (not once per run), with
    the trainer's own held-out rule (:func:`lmstack.train.data.resolve_splits`)."""
    from lmstack.train.data import load_train_tokenizer, resolve_splits
    from lmstack.train.distributed import DistEnv

    tok = load_train_tokenizer(train.data.tokenizer)
    splits = resolve_splits(train, root / "data", tok, DistEnv())
    data = dataclasses.replace(train.data, train=[str(splits.train)],
                               valid=[str(splits.valid)] if splits.valid is not None else [])
    return dataclasses.replace(train, data=data)


def fit_report(rows: list[dict[str, Any]], budgets: list[float]) -> tuple[ChinchillaFit, str]:
    """Fit the sweep rows and render a markdown table of the compute-optimal N and D per budget."""
    fit = fit_chinchilla([r["params"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows])
    lines = [f"L(N, D) = {fit.E:.3f} + {fit.A:.4g} / N^{fit.alpha:.3f} + {fit.B:.4g} / D^{fit.beta:.3f}",
             f"(fitted on {len(rows)} runs)", "", "| FLOPs | N_opt | D_opt | tokens/param | predicted loss |",
             "|---:|---:|---:|---:|---:|"]
    for c in budgets:
        n_opt, d_opt = fit.compute_optimal(c)
        lines.append(f"| {c:.2e} | {n_opt:.3g} | {d_opt:.3g} | {d_opt / n_opt:.1f} | {fit.loss(n_opt, d_opt):.3f} |")
    return fit, "\n".join(lines) + "\n"


def plot_fit(rows: list[dict[str, Any]], fit: ChinchillaFit, path: str | Path) -> Path:
    """Loss vs tokens per model size: the observed points and the fitted curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.runs import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    by_size: dict[float, list[dict]] = {}
    for r in rows:
        by_size.setdefault(r["params"], []).append(r)
    for n, rs in sorted(by_size.items()):
        rs = sorted(rs, key=lambda r: r["tokens"])
        line = ax.plot([r["tokens"] for r in rs], [r["loss"] for r in rs], "o", label=f"N={n:.3g}")[0]
        ds = torch.logspace(math.log10(rs[0]["tokens"]) - 0.2, math.log10(rs[-1]["tokens"]) + 0.2, 30).tolist()
        ax.plot(ds, [fit.loss(n, d) for d in ds], "-", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title("Chinchilla fit: L = E + A/N^a + B/D^b")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
