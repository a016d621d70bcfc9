"""Reward models: any lmstack decoder (or encoder) with a scalar head, trained on preference pairs.

For a decoder, ``add_scalar_head(model)`` replaces ``lm_head`` (d_model -> vocab) by a ``Linear(d_model, 1)``
through :func:`lmstack.model.swap.set_module`. The decoder's own forward then runs unchanged and returns
(B, T, 1), one score per position. The reward of a conversation is the score at its last response token (the
hidden state that has read the whole reply).

For an encoder (config ``arch = "encoder"``), the swap is the classification head: ``Linear(d_model, 1)`` over
the first token, through its pooler where it has one, as in a cross-encoder. The reward is
``classify(ids, mask)``, with the mask covering the conversation up to that same last response token, so
padding is never read. Training minimises the Bradley-Terry loss on pairs
(:func:`bradley_terry_loss`); held-out pairwise accuracy comes with a bootstrap interval
(:func:`lmstack.eval.stats.bootstrap_ci`). :func:`score` serves RL and judges.

A saved reward model is a model folder: ``model.safetensors`` + ``model_config.json`` (the decoder's) +
``reward_config.json`` (``{"head": "scalar", ...}``) marking the head; :func:`load_reward_model` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.align.config import RMConfig
from lmstack.errors import ConfigError, DataError
from lmstack.model.swap import set_module

IGNORE = -100
REWARD_CONFIG = "reward_config.json"


def add_scalar_head(model: nn.Module) -> nn.Module:
    """Swap ``model.lm_head`` (an encoder: ``model.classifier``) for a ``Linear(d_model, 1, bias=True)`` (in
    place; returns the model).

    The weight starts at N(0, 1/d_model) (as a sequence-classification head in transformers), the bias at 0,
    so rewards start small and the body gets gradients from the first step. A tied embedding stays with
    the embedding; a vocab-sized LM head bias is dropped with the head."""
    encoder = is_encoder(model)
    if not encoder and not hasattr(model, "lm_head"):
        raise ConfigError(f"a reward model needs a decoder with an lm_head or an encoder; got {type(model).__name__}")
    d = int(model.config.d_model)
    ref = next(model.parameters())
    head = nn.Linear(d, 1, bias=True, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    nn.init.normal_(head.weight, std=d ** -0.5)
    nn.init.zeros_(head.bias)
    if encoder:
        set_module(model, "classifier", head)
        model.config.n_labels = 1              # so the saved config rebuilds a head of this shape
        return model
    set_module(model, "lm_head", head)
    if getattr(model, "lm_head_bias", None) is not None:
        model.lm_head_bias = None
    return model


def is_encoder(model: nn.Module) -> bool:
    return getattr(model.config, "arch", "decoder") == "encoder" and hasattr(model, "classify")


def scalar_head(model: nn.Module) -> nn.Module:
    """The reward head :func:`add_scalar_head` put in: the decoder's ``lm_head`` or the encoder's ``classifier``."""
    return model.classifier if is_encoder(model) else model.lm_head


def last_response_index(labels: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last scored label per row: its input token is the reply's last token."""
    t = labels.shape[1]
    pos = torch.arange(t, device=labels.device).expand_as(labels)
    idx = torch.where(labels != IGNORE, pos, torch.full_like(pos, -1)).amax(-1)
    if bool((idx < 0).any()):
        raise DataError("a reward-model row has no response token to read the reward at")
    return idx


def rewards(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) float32 rewards: the scalar head's output at each row's last response token (an encoder: its
    classification score over the tokens up to it)."""
    idx = last_response_index(labels)
    if is_encoder(model):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = (pos[None, :] <= idx[:, None]).long()                         # (B, T): the conversation, no padding
        return model.classify(input_ids, attention_mask=mask)[:, 0].float()
    out = model(input_ids)                                                   # (B, T, 1)
    return out[torch.arange(out.shape[0], device=out.device), idx, 0].float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
                       ) -> torch.Tensor:
    r"""Mean Bradley-Terry negative log-likelihood of the preferences: :math:`-\log\sigma(r_c - r_r - m)`.

    Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs"; as the reward-model loss of
    Ouyang et al. 2022 (InstructGPT, eq. 1). ``margin`` :math:`m` (a float or a (B,) tensor) is Llama 2's
    (Touvron et al. 2023, eq. 2): pairs rated far apart must be separated by at least that much;
    None or 0 is the plain loss (trl's ``RewardTrainer``, with its optional ``margin`` column, is the same).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pair_rewards(model: nn.Module, items: list, batch_size: int, pad: int, device: torch.device
                 ) -> list[tuple[float, float]]:
    """(chosen reward, rejected reward) of every pair, in order."""
    from lmstack.align.data import fixed_batches

    out: list[tuple[float, float] | None] = [None] * len(items)
    was = model.training
    model.eval()
    with torch.no_grad():
        for idx, (x, y) in fixed_batches(items, batch_size, pad):
            r = rewards(model, x["input_ids"].to(device), y["labels"].to(device)).cpu()
            b = len(idx)
            for k, i in enumerate(idx):
                out[i] = (float(r[k]), float(r[b + k]))
    model.train(was)
    return out  # type: ignore[return-value]


def pair_accuracy(pairs: Sequence[tuple[float, float]], n_resamples: int = 1000, seed: int = 0
                  ) -> dict[str, Any]:
    """Share of pairs whose chosen reply gets the higher reward, with its 95% percentile-bootstrap interval."""
    from lmstack.eval.metrics.base import MetricResult
    from lmstack.eval.stats import bootstrap_ci

    hits = [1.0 if c > r else 0.0 for c, r in pairs]
    result = MetricResult("pair_accuracy", sum(hits) / len(hits), hits)
    lo, hi = bootstrap_ci(result, n_resamples=n_resamples, seed=seed)
    return {"accuracy": result.score, "ci": [lo, hi], "n": len(hits)}


@torch.no_grad()
def length_baseline(items: list, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The held-out accuracy of preferring the longer reply (response tokens; a tie counts half), with its
    95% bootstrap interval: on human preference data such as HH-RLHF length alone beats chance, so a
    reward model has to beat this, not 0.5, to show it learnt more than length (Singhal et al. 2023, "A Long
    Way to Go: Investigating Length Correlations in RLHF")."""
    from lmstack.eval.metrics.base import MetricResult
    from lmstack.eval.stats import bootstrap_ci

    if not items:
        return {"accuracy": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    hits = [1.0 if it.chosen.n_target > it.rejected.n_target else 0.5 if it.chosen.n_target == it.rejected.n_target
            else 0.0 for it in items]
    result = MetricResult("length_baseline", sum(hits) / len(hits), hits)
    lo, hi = bootstrap_ci(result, n_resamples=n_resamples, seed=seed)
    return {"accuracy": result.score, "ci": [lo, hi], "n": len(hits)}


def score(model: nn.Module, tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]],
          responses: Sequence[str], *, max_len: int = 512, batch_size: int = 16,
          device: torch.device | str | None = None) -> list[float]:
    """The reward of each (prompt, response): for RL rewards and judges. A prompt is a user message or a
    list of chat messages; the conversation is rendered with the chat template, as in training."""
    from lmstack.finetune.sft import collate, encode_messages

    if len(prompts) != len(responses):
        raise DataError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    exs = []
    for k, (p, resp) in enumerate(zip(prompts, responses)):
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        ex = encode_messages(tokenizer, [*msgs, {"role": "assistant", "content": resp}], max_len, f"item {k}",
                             last_turn_only=True)
        if ex is None:
            raise DataError(f"score: item {k}'s prompt leaves no room for the response in max_len={max_len}")
        exs.append(ex)
    from lmstack.align.offline import pad_id

    pad = pad_id(tokenizer)
    was = model.training
    model.eval()
    out: list[float] = []
    for b in range(0, len(exs), batch_size):
        x, y = collate(exs[b:b + batch_size], pad)
        out += rewards(model, x.to(device), y.to(device)).tolist()
    model.train(was)
    return out


def save_reward_model(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None,
                      meta: dict[str, Any] | None = None) -> Path:
    """A model folder (``lmstack.model.save``) plus ``reward_config.json`` marking the scalar head."""
    from lmstack.model import save
    from lmstack.runs import atomic_write_json

    folder = save(model, folder)
    atomic_write_json(folder / REWARD_CONFIG, {"head": "scalar", "read_at": "last_response_token", **(meta or {})})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_reward_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Read a folder written by :func:`save_reward_model`."""
    from safetensors.torch import load_file

    from lmstack.config import from_dict
    from lmstack.model import build_model
    from lmstack.model.config import ModelConfig
    from lmstack.runs import read_json

    folder = Path(folder)
    if not (folder / REWARD_CONFIG).is_file():
        raise DataError(f"{folder}: no {REWARD_CONFIG}; is this a reward model folder (lmstack align rm)?")
    cfg = from_dict(ModelConfig, read_json(folder / "model_config.json"))
    model = add_scalar_head(build_model(cfg))
    state = load_file(str(folder / "model.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{folder}: model.safetensors does not fit its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# the run


def make_loss_fn(cfg: RMConfig):
    def loss_fn(model: nn.Module, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], generator: Any):
        r = rewards(model, x["input_ids"], y["labels"])
        b = r.shape[0] // 2
        c, j = r[:b], r[b:]
        loss = bradley_terry_loss(c, j, cfg.margin or None)
        return loss, {"rewards_chosen": c.detach().mean(), "rewards_rejected": j.detach().mean(),
                      "margin": (c - j).detach().mean(), "accuracy": (c > j).float().mean()}

    return loss_fn


def heldout_metrics(pairs: list[tuple[float, float]], cfg: RMConfig) -> dict[str, float]:
    t = torch.tensor(pairs, dtype=torch.float64)
    c, r = t[:, 0], t[:, 1]
    return {"val_loss": float(bradley_terry_loss(c, r, cfg.margin or None)),
            "val_accuracy": float((c > r).double().mean()), "val_margin": float((c - r).mean()),
            "val_rewards_chosen": float(c.mean()), "val_rewards_rejected": float(r.mean())}


def train_reward_model(cfg: RMConfig) -> dict[str, Any]:
    """Train a reward model on ``cfg.data`` pairs; write the run folder (a loadable reward model)."""
    from lmstack.runs import remove_if_failed

    with remove_if_failed(cfg.run_dir):
        return _train(cfg)


def _train(cfg: RMConfig) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    from lmstack.align.data import PairLoader
    from lmstack.align.offline import announce, apply_method, finish, fit, start_run, train_config
    from lmstack.train.trainer import Task

    st = start_run(cfg, "pairs")
    run, device, model, tok, train, held, stats, pad = (st.run, st.device, st.model, st.tokenizer, st.train, st.held,
                                                        st.stats, st.pad)
    add_scalar_head(model)
    added = apply_method(model, cfg)
    scalar_head(model).requires_grad_(True)    # LoRA freezes everything but its adapters: the head trains too
    model.to(device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return heldout_metrics(pair_rewards(m, held, cfg.batch_size, pad, device), cfg)

    def save(m: nn.Module, folder: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                  str(folder / "reward_state.safetensors"))

    def load(m: nn.Module, folder: Path) -> None:
        m.load_state_dict(load_file(str(folder / "reward_state.safetensors")))

    before = pair_accuracy(pair_rewards(model, held, cfg.batch_size, pad, device), cfg.bootstrap, cfg.seed)
    task = Task(model=model, loader=PairLoader(train, cfg.batch_size, pad, cfg.seed), eval_batches=lambda: [],
                tokenizer=tok, save_weights=save, load_weights=load, loss_fn=make_loss_fn(cfg), evaluate=evaluate)
    summary, seconds = fit(train_config(cfg, run, len(held), model.config.vocab_size), task)
    held_pairs = pair_rewards(model, held, cfg.batch_size, pad, device)
    after = pair_accuracy(held_pairs, cfg.bootstrap, cfg.seed)
    (run / "reward_state.safetensors").unlink(missing_ok=True)
    if cfg.method == "lora":
        from lmstack.finetune.lora import merge_and_unload

        merge_and_unload(model)
    save_reward_model(model, run, tok, {"base": str(Path(cfg.base).resolve()), "trained_steps": cfg.steps})
    results = {"method": cfg.method, "base": cfg.base, "steps": cfg.steps, "lr": cfg.learning_rate,
               "margin": cfg.margin, "before": before, "after": after, "heldout": heldout_metrics(held_pairs, cfg),
               "length_baseline": length_baseline(held, cfg.bootstrap, cfg.seed),
               "data": stats, "added": added, "tokens_per_s": summary.get("tokens_per_s"),
               "train_seconds": round(seconds, 2)}
    finish(run, results, render_report(results))
    announce(f"reward model ({cfg.method}): held-out pair accuracy {after['accuracy']:.3f} "
             f"[{after['ci'][0]:.3f}, {after['ci'][1]:.3f}] on {after['n']} pairs -> {run}")
    return results


def render_report(r: dict[str, Any]) -> str:
    d, a = r["data"], r["after"]
    return "\n".join([
        f"Reward model (Bradley-Terry{', margin ' + format(r['margin'], 'g') if r['margin'] else ''}), method "
        f"**{r['method']}**, {r['steps']} steps at lr {r['lr']:g} on {d['train_items']:,} pairs.", "",
        "| held-out pairs | accuracy | 95% bootstrap CI | margin (chosen - rejected) | BT loss |",
        "|---:|---:|---|---:|---:|",
        f"| {a['n']} | {a['accuracy']:.3f} | [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {r['heldout']['val_margin']:.4f} "
        f"| {r['heldout']['val_loss']:.4f} |", "",
        f"Before training (a random head) the held-out accuracy is {r['before']['accuracy']:.3f} "
        f"[{r['before']['ci'][0]:.3f}, {r['before']['ci'][1]:.3f}].", ""]
        + ([f"Preferring the longer reply scores {lb['accuracy']:.3f} [{lb['ci'][0]:.3f}, {lb['ci'][1]:.3f}] on the "
            f"same pairs: the bar for a model that learnt more than length.", ""]
           if (lb := r.get("length_baseline")) and lb["n"] else []))


def main_config(path: str | None, overrides: list[str]) -> RMConfig:
    from lmstack.config import load_config

    return load_config(RMConfig, path, overrides)


__all__ = ["add_scalar_head", "scalar_head", "is_encoder", "rewards", "bradley_terry_loss", "pair_accuracy", "length_baseline", "score",
           "save_reward_model", "load_reward_model", "train_reward_model"]
