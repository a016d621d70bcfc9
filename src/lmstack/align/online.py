"""Online RL on the one trainer: rollout buffers served as minibatches, GRPO or PPO as the Task's loss.

``run_online(cfg)`` builds the policy (full fine-tuning or LoRA), the frozen reference (a copy; with LoRA
the same model with its adapter disabled, :func:`lmstack.finetune.lora.adapters_disabled`, no second copy),
for PPO the value model, the prompt set and the rewards, and runs :class:`lmstack.train.trainer.Trainer`
with a :class:`~lmstack.train.trainer.Task` whose loader is a :class:`RolloutLoader`:

- ``next_batch()`` serves minibatches of the current rollout buffer; when the buffer is spent it refills
  it: the next ``rollout.prompts`` prompts (a seeded shuffle per epoch over the train prompts), sampled
  ``rollout.num_samples`` times each with the current policy by the batched engine, scored by the rewards,
  with the rollout policy's and the reference's per-token log-probs (and PPO's values, GAE advantages and
  returns) computed once per buffer; ``ppo_epochs`` shuffled passes per buffer;
- ``state_dict()`` holds the prompt position, the refill count (which seeds the sampler and the minibatch
  order) and the unspent buffer itself, so a resumed run continues on the same samples, bit for bit on CPU.

The run directory is the trainer's (config.json, metrics.jsonl, checkpoints/, summary.json) plus the policy
(``model.safetensors`` for full fine-tuning, ``adapter.safetensors`` for LoRA, ``value.safetensors`` for
PPO's value model), ``tokenizer.json``, ``reward.png`` (the reward curve) and ``report.md``.
Every step logs, besides the loss: ``reward_mean``/``reward_std`` (and each reward term's mean),
``kl``, ``entropy``, ``clip_frac``, ``response_len``, ``rollout_s`` (the buffer's generation + scoring),
``rollout_tok_s``, ``update_s`` (the previous buffer's optimizer steps), ``reward_failures``; held-out ``exact_match_strict``/``exact_match_lenient``/
``reward_mean`` are logged as eval rows.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.align.rewards import RewardFn, RewardStats, combine, exact_match
from lmstack.align.rl_config import OnlineConfig
from lmstack.align.rl_data import Item
from lmstack.errors import ConfigError, DataError

STATS_SHOWN = ("reward_mean", "kl", "response_len", "rollout_s", "update_s")   # on the progress line


def _pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}


def _unpack_tensor(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).view(d["shape"])


class RolloutLoader:
    """Minibatches from rollout buffers, refilled with the current policy when spent (module docstring)."""

    def __init__(self, cfg: OnlineConfig, policy: nn.Module, tokenizer: Any, items: list[Item],
                 rewards: list[tuple[RewardFn, float]], ref_logps: Any = None, value: nn.Module | None = None):
        if len(items) < cfg.rollout.prompts:
            raise DataError(f"{len(items)} train prompts, fewer than rollout.prompts = {cfg.rollout.prompts}")
        self.cfg, self.policy, self.tokenizer, self.items = cfg, policy, tokenizer, items
        self.rewards, self.ref_logps_fn, self.value = rewards, ref_logps, value
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.epoch, self.pos, self.refills, self.mb = 0, 0, 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.order: list[list[int]] = []
        self.stats: dict[str, float] = {}
        self.reward_stats = RewardStats()
        self.totals = {"generate_s": 0.0, "score_s": 0.0, "rollout_tokens": 0}
        self._refilled_at: float | None = None

    # -- prompts ----------------------------------------------------------------------------------------
    def _shuffled(self, epoch: int) -> list[int]:
        idx = list(range(len(self.items)))
        random.Random(f"{self.cfg.seed}:prompts:{epoch}").shuffle(idx)
        return idx

    def _next_prompts(self) -> list[Item]:
        out: list[Item] = []
        order = self._shuffled(self.epoch)
        while len(out) < self.cfg.rollout.prompts:
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._shuffled(self.epoch)
            out.append(self.items[order[self.pos]])
            self.pos += 1
        return out

    # -- one buffer --------------------------------------------------------------------------------------
    def _refill(self) -> None:
        from lmstack.align.grpo import group_advantages
        from lmstack.align.ppo import gae, response_values, token_rewards, whiten
        from lmstack.align.rollout import generate_rollouts, pack, response_logps, sampling_config

        cfg, r = self.cfg, self.cfg.rollout
        # the previous buffer's update time: from the end of its refill to now (its optimizer steps)
        update_s = time.perf_counter() - self._refilled_at if self._refilled_at is not None else 0.0
        items = self._next_prompts()
        gen = sampling_config(r.max_new_tokens, r.temperature, r.top_p, seed=cfg.seed * 7919 + self.refills,
                              num_samples=r.num_samples)
        was_training = self.policy.training
        ro = generate_rollouts(self.policy, self.tokenizer, items, gen, r.batch_size or None)
        t0 = time.perf_counter()
        scores, parts = combine(self.rewards, ro.texts, ro.items, self.reward_stats)
        x, y = pack(ro.prompt_ids, ro.response_ids, self.pad_id)
        mask = y != -100
        old = response_logps(self.policy, x, y, cfg.minibatch_size, r.temperature)
        ref = self.ref_logps_fn(x, y) if self.ref_logps_fn is not None else torch.zeros_like(old)
        score_t = torch.tensor(scores, dtype=torch.float32)
        valid = ~torch.isnan(score_t)
        mask = mask & valid[:, None]                       # a failed reward: no tokens, no gradient
        buf = {"input_ids": x, "labels": y, "old_logps": old, "ref_logps": ref}
        if cfg.algo == "grpo":
            buf["advantages"] = group_advantages(score_t, r.num_samples, cfg.grpo.scale_rewards)
        else:
            p = cfg.ppo
            values = response_values(self.value, x, mask, cfg.minibatch_size)
            rewards, _ = token_rewards(torch.nan_to_num(score_t), old, ref, mask, p.kl_coef)
            if p.whiten_rewards and mask.sum() > 1:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
            adv = (whiten(adv, mask) if mask.sum() > 1 else adv) * mask
            buf.update(advantages=adv, old_values=values, returns=returns)
        buf["mask"] = mask.to(torch.float32)
        buf["lengths"] = torch.tensor([len(p) + len(q) - 1 for p, q in zip(ro.prompt_ids, ro.response_ids)])
        self.policy.train(was_training)
        score_s = time.perf_counter() - t0
        self.totals["generate_s"] += ro.seconds
        self.totals["score_s"] += score_s
        self.totals["rollout_tokens"] += ro.new_tokens

        n = len(ro)
        g = torch.Generator().manual_seed(cfg.seed * 104729 + self.refills)
        self.order = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=g).tolist()
            self.order += [perm[s:s + cfg.minibatch_size] for s in range(0, n, cfg.minibatch_size)]
        self.buffer, self.mb = buf, 0
        self.refills += 1
        ok = score_t[valid]
        m = mask.to(torch.float32)
        lens = torch.tensor([len(t) for t in ro.response_ids], dtype=torch.float32)
        self.stats = {
            "rollout": float(self.refills),
            "reward_mean": float(ok.mean()) if ok.numel() else math.nan,
            "reward_std": float(ok.std()) if ok.numel() > 1 else 0.0,
            "response_len": float(lens.mean()),
            "rollout_kl": float(((old - ref) * m).sum() / m.sum().clamp(min=1)),
            "rollout_s": round(ro.seconds + score_s, 4), "generate_s": round(ro.seconds, 4),
            "rollout_tok_s": round(ro.tokens_per_s, 1),
            "truncated_frac": sum(f == "length" for f in ro.finish_reasons) / n,
            "reward_failures": float(self.reward_stats.total_failed),
            "update_s": round(update_s, 4),
        }
        for name, vals in parts.items():
            good = [v for v in vals if not math.isnan(v)]
            self.stats[f"reward_{name}"] = sum(good) / len(good) if good else math.nan
        self._refilled_at = time.perf_counter()

    # -- the loader contract ---------------------------------------------------------------------------------
    def next_batch(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.buffer is None or self.mb >= len(self.order):
            self._refill()
        assert self.buffer is not None
        idx = self.order[self.mb]
        step_first = self.mb - self.mb % self.cfg.grad_accum
        step_rows = [i for b in self.order[step_first:step_first + self.cfg.grad_accum] for i in b]
        self.mb += 1
        rows = torch.tensor(idx)
        width = max(int(self.buffer["lengths"][rows].max()), 1)   # right-padded: cut the common padding
        x: dict[str, Any] = {k: v[rows][:, :width] for k, v in self.buffer.items() if v.dim() == 2}
        x.update({k: v[rows] for k, v in self.buffer.items() if v.dim() == 1})
        # DAPO's token-level mean is over the whole optimizer step: each micro-batch's share of that count
        x["step_tokens"] = self.buffer["mask"][torch.tensor(step_rows)].sum() / self.cfg.grad_accum
        x["stats"] = {k: v for k, v in self.stats.items() if not (isinstance(v, float) and math.isnan(v))}
        return x, {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "refills": self.refills, "mb": self.mb, "order": self.order,
                "stats": self.stats, "totals": self.totals,
                "reward_failed": self.reward_stats.failed, "reward_scored": self.reward_stats.scored,
                "buffer": None if self.buffer is None else {k: _pack_tensor(v) for k, v in self.buffer.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos, self.refills, self.mb = (int(state[k]) for k in ("epoch", "pos", "refills", "mb"))
        self.order = [list(map(int, b)) for b in state["order"]]
        self.stats, self.totals = dict(state["stats"]), dict(state["totals"])
        self.reward_stats.failed = {k: int(v) for k, v in state["reward_failed"].items()}
        self.reward_stats.scored = int(state["reward_scored"])
        buf = state["buffer"]
        self.buffer = None if buf is None else {k: _unpack_tensor(v) for k, v in buf.items()}


# ----------------------------------------------------------------------------------------------------------
# building the run


def load_items(cfg: OnlineConfig) -> tuple[list[Item], list[Item]]:
    """(train prompts, held-out prompts) as the config's data section says."""
    from lmstack.align.rl_data import arithmetic_items, gsm8k_items, row_items, split_items

    d = cfg.data
    if d.source == "arithmetic":
        a = d.arithmetic
        kw = {"seed": cfg.seed, "max_operand": a.max_operand, "n_terms": a.n_terms, "ops": a.ops,
              "max_value": a.max_value, "heldout_fraction": d.heldout_fraction, "system": d.system}
        # train_offset: the first questions of the seeded order went to a warm-up; RL takes the ones after them
        try:
            train = arithmetic_items(a.train_offset + a.train_items, split="train", **kw)[a.train_offset:]
        except DataError:
            have = len(arithmetic_items(None, split="train", **kw))
            raise DataError(f"data.arithmetic: train_offset {a.train_offset} + train_items {a.train_items} asks for "
                            f"{a.train_offset + a.train_items} train-side questions, but only {have} exist with "
                            f"max_operand={a.max_operand}, n_terms={a.n_terms}, max_value={a.max_value}; set "
                            f"train_items <= {max(have - a.train_offset, 0)}") from None
        return train, arithmetic_items(a.heldout_items, split="heldout", **kw)
    reader = gsm8k_items if d.source == "gsm8k" else row_items
    train = reader(d.train, limit=d.max_train, system=d.system)
    if d.valid:
        held = reader(d.valid, limit=d.eval_items or None, system=d.system)
    else:
        train, held = split_items(train, d.heldout_fraction, cfg.seed)
    return train, held[: d.eval_items]


def build_rewards(cfg: OnlineConfig, reward_model: Any = None) -> list[tuple[RewardFn, float]]:
    """The weighted reward terms of ``cfg.reward`` (``reward_model``: any ``score(prompts, responses)``)."""
    from lmstack.align.rewards import code_reward, default_rewards, reward_model_reward

    rw = cfg.reward
    out = default_rewards(rw.correct, rw.lenient, rw.format)
    if rw.code:
        out.append((code_reward(), rw.code))
    if reward_model is None and rw.reward_model:
        try:
            from lmstack.align.reward import load_reward_model  # the reward-model layer
        except ImportError:
            raise ConfigError("reward.reward_model: this install has no lmstack.align.reward.load_reward_model; "
                              "pass a scorer to run_online(reward_model=...) instead") from None
        reward_model = load_reward_model(rw.reward_model)
    if reward_model is not None:
        out.append((reward_model_reward(reward_model), rw.reward_model_weight))
    return out


def _fits(tokenizer: Any, items: list[Item], ctx: int, max_new: int) -> tuple[list[Item], int]:
    from lmstack.align.rl_data import prompt_ids

    keep = [it for it in items if len(prompt_ids(tokenizer, it)) + max_new <= ctx]
    return keep, len(items) - len(keep)


def load_policy(cfg: OnlineConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """The policy (an adapter run's adapter merged in first, so the RL method starts from a plain model)."""
    from lmstack.finetune.lora import lora_layers, merge_and_unload
    from lmstack.infer.text import load_run

    model, tok = load_run(cfg.base, device=str(device))
    if lora_layers(model):
        model = merge_and_unload(model)
    if cfg.tokenizer:
        from lmstack.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device).train(), tok


def evaluate_policy(model: nn.Module, tokenizer: Any, items: list[Item], rewards: list[tuple[RewardFn, float]],
                    max_new_tokens: int, texts_out: list[str] | None = None) -> dict[str, float]:
    """Greedy answers to held-out prompts: strict and lenient exact match and the mean reward
    (``texts_out``: a list the answers are appended to, for a paired comparison)."""
    from lmstack.align.rollout import greedy_answers

    if not items:
        return {}
    policy = getattr(model, "policy", model)
    texts = greedy_answers(policy, tokenizer, items, max_new_tokens)
    if texts_out is not None:
        texts_out.extend(texts)
    scores, _ = combine(rewards, texts, items)
    good = [s for s in scores if not math.isnan(s)]
    em = exact_match(texts, items) if all("answer" in it for it in items) else {}
    out = {**em, "reward_mean": sum(good) / max(len(good), 1)}
    if "exact_match_strict" in out:
        out["val_loss"] = 1.0 - out["exact_match_strict"]   # the trainer keeps the lowest: the most accurate
    return out


def paired_change(before: list[str], after: list[str], items: list[Item], seed: int = 0) -> dict[str, Any]:
    """The held-out change, item by item (the same prompts, greedy, before and after training): for the strict
    and the lenient exact match, how many items turned right and how many turned wrong, the change with its
    95% paired bootstrap interval (Koehn 2004) and the approximate-randomisation p-value
    (:mod:`lmstack.eval.stats`). A 300-item held-out set moves by 0.003 per item, so a change of a few points
    needs this to be told from the noise of one run."""
    from lmstack.align.rewards import correct_lenient, correct_strict
    from lmstack.eval.metrics.base import MetricResult
    from lmstack.eval.stats import paired_bootstrap, paired_permutation

    out: dict[str, Any] = {"items": len(items)}
    for name, fn in (("strict", correct_strict), ("lenient", correct_lenient)):
        b, a = fn(before, items), fn(after, items)
        mb = MetricResult(f"exact_match_{name}", sum(b) / max(len(b), 1), list(b))
        ma = MetricResult(f"exact_match_{name}", sum(a) / max(len(a), 1), list(a))
        boot = paired_bootstrap(mb, ma, n_resamples=2000, seed=seed)
        perm = paired_permutation(mb, ma, n_resamples=2000, seed=seed)
        out[name] = {"turned_right": sum(1 for x, y in zip(b, a) if y > x),
                     "turned_wrong": sum(1 for x, y in zip(b, a) if y < x),
                     "delta": round(boot["delta"], 4), "ci95": [round(v, 4) for v in boot["ci"]],
                     "p_value": round(float(perm["p_value"]), 4)}
    return out


def run_online(cfg: OnlineConfig, reward_model: Any = None, extra_rewards: list[tuple[RewardFn, float]] | None = None,
               resume: bool = False, until: int | None = None) -> dict[str, Any]:
    """Run GRPO or PPO as ``cfg`` says; write the run directory; return the results (module docstring).

    ``reward_model``: any ``score(prompts, responses)`` scorer, added with ``reward.reward_model_weight``;
    ``extra_rewards``: more ``(fn, weight)`` terms; ``resume``: continue from the newest checkpoint;
    ``until``: stop after that step without finishing (as a crash would; for tests of the resume).
    """
    from lmstack.align.grpo import make_grpo_loss_fn
    from lmstack.align.ppo import ActorCritic, make_ppo_loss_fn, value_model
    from lmstack.align.rollout import response_logps
    from lmstack.finetune.lora import LoraConfig, adapters_disabled, add_lora
    from lmstack.runs import atomic_write_json, atomic_write_text
    from lmstack.runtime import resolve_device, seed_everything
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer, read_metrics

    if not Path(cfg.base).exists():
        raise ConfigError(f"base: {cfg.base} does not exist; name the policy's model folder or run")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    policy, tok = load_policy(cfg, device)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tok.save(run)
    ctx = int(policy.config.max_seq_len)
    if cfg.rollout.max_new_tokens >= ctx:
        raise ConfigError(f"rollout.max_new_tokens = {cfg.rollout.max_new_tokens} leaves no room for a prompt in "
                          f"the model's context of {ctx}")
    train_items, held = load_items(cfg)
    train_items, dropped = _fits(tok, train_items, ctx, cfg.rollout.max_new_tokens)
    held, dropped_held = _fits(tok, held, ctx, cfg.rollout.max_new_tokens)
    if dropped or dropped_held:
        print(f"[align] skipped {dropped} train and {dropped_held} held-out prompts longer than the context "
              f"({ctx}) minus rollout.max_new_tokens", file=sys.stderr)
    if not train_items:
        raise DataError("no train prompt fits the context; lower rollout.max_new_tokens")
    rewards = build_rewards(cfg, reward_model) + list(extra_rewards or [])

    lora_cfg = None
    if cfg.method == "lora":
        from lmstack.config import from_dict

        lora_cfg = from_dict(LoraConfig, dict(cfg.lora))
        add_lora(policy, lora_cfg)
    needs_ref = (cfg.grpo.beta if cfg.algo == "grpo" else cfg.ppo.kl_coef) != 0
    ref_model = None
    if needs_ref and cfg.method == "full":
        ref_model = copy.deepcopy(policy).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)

    def ref_logps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if ref_model is not None:
            return response_logps(ref_model, x, y, cfg.minibatch_size, cfg.rollout.temperature)
        with adapters_disabled(policy):          # LoRA: the base is the reference
            return response_logps(policy, x, y, cfg.minibatch_size, cfg.rollout.temperature)

    value = None
    if cfg.algo == "ppo":
        value = value_model(policy)
        model: nn.Module = ActorCritic(policy, value)
        loss_fn = make_ppo_loss_fn(cfg.ppo.clip_range, cfg.ppo.clip_range_value, cfg.ppo.vf_coef,
                                   cfg.rollout.temperature)
    else:
        model = policy
        g = cfg.grpo
        loss_fn = make_grpo_loss_fn(g.beta, g.epsilon, g.epsilon_high, g.loss_type, cfg.rollout.max_new_tokens,
                                    cfg.rollout.temperature)
    loader = RolloutLoader(cfg, policy, tok, train_items, rewards, ref_logps if needs_ref else None, value)

    base_config = None
    if lora_cfg is not None:
        from lmstack.config import to_dict
        from lmstack.finetune.run import base_fingerprint

        base_config = to_dict(policy.config)

    def save_weights(m: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        from lmstack.model import save
        from lmstack.runs import atomic_path

        pol = getattr(m, "policy", m)
        if lora_cfg is None:
            save(pol, folder)
        else:
            from lmstack.finetune.run import FinetuneConfig, save_adapter

            with adapters_disabled(pol):
                fp = base_fingerprint(pol)
            save_adapter(pol, folder, FinetuneConfig(method="lora", base=cfg.base, lora=lora_cfg), base_config, fp)
        if isinstance(m, ActorCritic):
            state = {k: v.detach().contiguous().cpu() for k, v in m.value.state_dict().items()}
            with atomic_path(Path(folder) / "value.safetensors") as tmp:
                save_file(state, str(tmp))

    def load_weights(m: nn.Module, folder: Path) -> None:
        from safetensors.torch import load_file, load_model

        from lmstack.finetune.lora import load_adapter_state

        pol = getattr(m, "policy", m)
        if lora_cfg is None:
            load_model(pol, str(Path(folder) / "model.safetensors"), strict=False)
        else:
            load_adapter_state(pol, load_file(str(Path(folder) / "adapter.safetensors")))
        if isinstance(m, ActorCritic):
            m.value.load_state_dict(load_file(str(Path(folder) / "value.safetensors")))

    eval_time = [0.0]

    def evaluate(m: nn.Module) -> dict[str, float]:
        t = time.perf_counter()
        out = evaluate_policy(m, tok, held, rewards, cfg.rollout.max_new_tokens)
        eval_time[0] += time.perf_counter() - t
        return out

    seq_len = ctx
    tcfg = TrainConfig(run_dir=str(run), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, steps=cfg.steps,
                       batch_size=cfg.minibatch_size, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                       eval_every=cfg.eval_every, eval_batches=1, ckpt_every=cfg.ckpt_every, sample_prompts=[],
                       model={"vocab_size": policy.config.vocab_size}, data=DataConfig(seq_len=seq_len),
                       optim=OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         warmup_steps=min(cfg.warmup_steps, cfg.steps), schedule=cfg.schedule,
                                         grad_clip=cfg.grad_clip))
    task = Task(model=model, loader=loader, eval_batches=list, tokenizer=tok, save_weights=save_weights,
                load_weights=load_weights, loss_fn=loss_fn, evaluate=evaluate, progress_metrics=STATS_SHOWN)
    before_texts: list[str] = []
    before = evaluate_policy(policy, tok, held, rewards, cfg.rollout.max_new_tokens, before_texts) if held else {}
    def ref_state() -> dict[str, torch.Tensor]:   # the reference's weights: the copy, or LoRA's frozen base
        if ref_model is not None:
            return dict(ref_model.state_dict())
        return {n: p for n, p in policy.named_parameters() if not p.requires_grad}

    ref_before = {k: v.detach().clone() for k, v in ref_state().items()} if needs_ref else None
    t0 = time.perf_counter()
    trainer = Trainer(tcfg, resume=resume, task=task)
    try:
        summary = trainer.fit(until=until)
    finally:
        trainer.close()
    if until is not None and "stopped_at" in summary:
        return summary
    seconds = time.perf_counter() - t0
    after_texts: list[str] = []
    after = evaluate_policy(policy, tok, held, rewards, cfg.rollout.max_new_tokens, after_texts) if held else {}
    paired = paired_change(before_texts, after_texts, held, cfg.seed) if held and all("answer" in it for it in held) \
        else None
    # the reference is frozen: checked, since a shared tensor or a stray optimizer group would move it
    ref_unchanged = ref_before is None or all(torch.equal(ref_before[k], v) for k, v in ref_state().items())
    rows = read_metrics(run / "metrics.jsonl")
    curve = plot_reward_curve(rows, run / "reward.png", before)
    train_rows = [row for row in rows if "reward_mean" in row and "loss" in row]
    tot = loader.totals
    rollout_s = tot["generate_s"] + tot["score_s"]
    update_s = max(seconds - rollout_s - eval_time[0], 0.0)
    results = {
        "algo": cfg.algo, "method": cfg.method, "base": cfg.base, "steps": cfg.steps,
        "rollouts": loader.refills, "heldout_items": len(held), "train_prompts": len(train_items),
        "before": before, "after": after, "paired": paired,
        "timing": {"seconds": round(seconds, 2), "rollout_s": round(rollout_s, 2),
                   "generate_s": round(tot["generate_s"], 2), "score_s": round(tot["score_s"], 2),
                   "update_s": round(update_s, 2), "eval_s": round(eval_time[0], 2),
                   "rollout_fraction": round(rollout_s / max(rollout_s + update_s, 1e-9), 3),
                   "rollout_tokens": tot["rollout_tokens"],
                   "rollout_tokens_per_s": round(tot["rollout_tokens"] / max(tot["generate_s"], 1e-9), 1)},
        "reward_curve": str(curve) if curve else None, "reference_unchanged": ref_unchanged,
        "reward_first": train_rows[0]["reward_mean"] if train_rows else None,
        "reward_last": train_rows[-1]["reward_mean"] if train_rows else None,
        "reward_failures": loader.reward_stats.total_failed, "reward_summary": loader.reward_stats.summary(),
        "train_loss": summary.get("train_loss"), "tokens_per_s": summary.get("tokens_per_s"),
    }
    atomic_write_json(run / "summary.json", {**summary, **results})
    atomic_write_text(run / "report.md", render_report(results))
    print(f"[align] {loader.reward_stats.summary()}", file=sys.stderr)
    return results


def plot_reward_curve(rows: list[dict[str, Any]], path: Path, before: dict[str, float] | None = None) -> Path | None:
    """The rollout reward per buffer (thin) and its moving mean over 5 buffers (bold), and the held-out exact
    match (strict and lenient, from step 0: ``before``) at each evaluation, against the step, as a PNG. Every
    optimizer step of a buffer logs that buffer's reward, so the curve keeps one point per buffer."""
    train = [r for r in rows if "reward_mean" in r and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.runs import save_figure

    per_buffer: dict[Any, dict[str, Any]] = {}
    for r in train:
        per_buffer.setdefault(r.get("rollout", r["step"]), r)
    buffers = list(per_buffer.values())
    steps = [r["step"] for r in buffers]
    mean = [r["reward_mean"] for r in buffers]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(steps, mean, lw=0.8, alpha=0.45, color="tab:blue", label="rollout reward (per buffer)")
    if len(mean) >= 5:
        smooth = [sum(mean[max(0, i - 4):i + 1]) / len(mean[max(0, i - 4):i + 1]) for i in range(len(mean))]
        ax.plot(steps, smooth, lw=2, color="tab:blue", label="rollout reward (mean of 5 buffers)")
    evals = ([{"step": 0, **before}] if before and "exact_match_strict" in before else []) + \
        [r for r in rows if "exact_match_strict" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["exact_match_strict"] for r in evals], "o--", color="tab:orange",
                label="held-out exact match, strict")
        if any(abs(r.get("exact_match_lenient", r["exact_match_strict"]) - r["exact_match_strict"]) > 1e-9
               for r in evals):
            ax.plot([r["step"] for r in evals], [r["exact_match_lenient"] for r in evals], "s:", color="tab:green",
                    label="held-out exact match, lenient")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / exact match")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def paired_line(paired: dict[str, Any]) -> str:
    """One sentence on :func:`paired_change`'s result."""
    parts = []
    for name in ("strict", "lenient"):
        c = paired[name]
        parts.append(f"{name} {c['delta']:+.3f} (95% paired bootstrap CI [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], "
                     f"permutation p = {c['p_value']:.3f}; {c['turned_right']} items turned right, "
                     f"{c['turned_wrong']} turned wrong)")
    return f"Change on the {paired['items']} held-out items: " + "; ".join(parts) + "."


def render_report(r: dict[str, Any]) -> str:
    t = r["timing"]
    b, a = r.get("before", {}), r.get("after", {})
    lines = [f"**{r['algo'].upper()}** ({r['method']}), {r['steps']} steps over {r['rollouts']} rollout buffers.", ""]
    if b:
        lines += ["| held-out | before | after |", "|---|---:|---:|"]
        for k in ("exact_match_strict", "exact_match_lenient", "reward_mean"):
            if k in b:
                lines.append(f"| {k} | {b[k]:.3f} | {a.get(k, float('nan')):.3f} |")
        lines.append("")
        if r.get("paired"):
            lines += [paired_line(r["paired"]), ""]
    lines += [(f"Time: {t['seconds']:.1f} s; rollouts {t['rollout_s']:.1f} s ({t['rollout_fraction']:.0%}; "
              f"{t['rollout_tokens_per_s']:.0f} generated tokens/s), updates {t['update_s']:.1f} s, "
              f"held-out evaluation {t['eval_s']:.1f} s."), "", r["reward_summary"], ""]
    if r.get("reward_curve"):
        lines.append("![reward curve](reward.png)")
    return "\n".join(lines)
