"""The configs of ``lmstack align ppo|grpo`` (no torch here: the CLI validates a config before importing it).

One file names a policy (``base``), a prompt set, rewards, the rollout sampler and the algorithm's knobs::

    base = "runs/sft"            # an lmstack model folder or run (a fine-tuned one), or a Hugging Face folder
    method = "lora"              # full | lora  (LoRA: the reference is the base with the adapter disabled)
    steps = 40                   # optimizer steps
    minibatch_size = 8           # sequences per micro-batch
    ppo_epochs = 1               # passes over each rollout buffer
    lr = 1e-5

    [data]
    source = "arithmetic"        # arithmetic | gsm8k | rows
    [rollout]
    prompts = 8                  # prompts per rollout buffer
    num_samples = 4              # responses per prompt (GRPO's group size G)
    max_new_tokens = 48
    [reward]
    correct = 1.0                # strict exact match
    format = 0.1                 # the <think>...</think> #### N template
    [grpo]
    beta = 0.04
    loss_type = "grpo"           # grpo | dr_grpo | dapo

A buffer holds ``rollout.prompts * rollout.num_samples`` sequences; it is cut into minibatches of
``minibatch_size`` (``ppo_epochs`` shuffled passes), ``grad_accum`` of them per optimizer step, so the
buffer size must be a multiple of ``minibatch_size * grad_accum``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import ConfigError


def _bad(name: str, why: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}: {why} (got {value!r})")


@dataclass
class ArithmeticConfig:
    max_operand: int = 20
    n_terms: int = 2
    ops: list[str] = field(default_factory=lambda: ["+", "-"])
    max_value: int | None = None     # keep questions whose every running value is in 0..max_value
    train_items: int = 2000
    heldout_items: int = 64
    train_offset: int = 0            # skip the first N train questions (a supervised warm-up's share): new prompts

    def __post_init__(self) -> None:
        if self.train_offset < 0:
            raise _bad("data.arithmetic.train_offset", "must be >= 0", self.train_offset)
        if self.max_operand < 1:
            raise _bad("data.arithmetic.max_operand", "must be >= 1", self.max_operand)
        if self.n_terms < 2:
            raise _bad("data.arithmetic.n_terms", "must be >= 2", self.n_terms)
        if not self.ops or any(o not in ("+", "-", "*") for o in self.ops):
            raise _bad("data.arithmetic.ops", "use some of '+', '-', '*'", self.ops)
        if self.max_value is not None and self.max_value < 1:
            raise _bad("data.arithmetic.max_value", "must be >= 1 (or unset for no bound)", self.max_value)


@dataclass
class RLDataConfig:
    source: Literal["arithmetic", "gsm8k", "rows"] = "arithmetic"
    train: list[str] = field(default_factory=list)   # gsm8k / rows: files, folders, globs
    valid: list[str] = field(default_factory=list)   # empty: hold out heldout_fraction of train
    heldout_fraction: float = 0.1
    max_train: int | None = None                     # read at most this many train rows
    eval_items: int = 64                             # held-out prompts scored by evaluate
    system: str = ""                                 # a system message put before every prompt
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:
        if self.source not in ("arithmetic", "gsm8k", "rows"):
            raise _bad("data.source", "must be arithmetic, gsm8k or rows", self.source)
        if self.source != "arithmetic" and not self.train:
            raise ConfigError(f"data.train: name the {self.source} prompt files (data.source = {self.source!r})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise _bad("data.heldout_fraction", "must be in (0, 1)", self.heldout_fraction)
        if self.eval_items < 0:
            raise _bad("data.eval_items", "must be >= 0", self.eval_items)


@dataclass
class RolloutConfig:
    prompts: int = 8               # prompts per rollout buffer
    num_samples: int = 4           # responses per prompt (GRPO's G; PPO usually 1)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 0            # prompts per engine call; 0 = the whole buffer at once

    def __post_init__(self) -> None:
        for name in ("prompts", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise _bad(f"rollout.{name}", "must be >= 1", getattr(self, name))
        if not self.temperature > 0:
            raise _bad("rollout.temperature", "must be > 0 (rollouts sample)", self.temperature)
        if not 0 < self.top_p <= 1:
            raise _bad("rollout.top_p", "must be in (0, 1]", self.top_p)


@dataclass
class RewardConfig:
    """Weights of the reward terms (0 = off); the reward is their weighted sum."""

    correct: float = 1.0           # strict exact match (the '#### N' answer)
    lenient: float = 0.0           # last-number exact match
    format: float = 0.1            # the <think>...</think> template
    code: float = 0.0              # code + the row's tests pass in the sandbox
    reward_model: str = ""         # a reward-model folder (lmstack.align.reward), weighted by reward_model_weight
    reward_model_weight: float = 1.0

    def __post_init__(self) -> None:
        if not any([self.correct, self.lenient, self.format, self.code, self.reward_model]):
            raise ConfigError("reward: every weight is 0; set reward.correct, reward.format, reward.code or "
                              "reward.reward_model")


@dataclass
class GRPOConfig:
    beta: float = 0.04             # KL coefficient (k3 estimator to the reference); 0 = no reference pass
    epsilon: float = 0.2           # clip range low (and high unless epsilon_high)
    epsilon_high: float | None = None   # DAPO's clip-higher
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "none"] = "group"   # none: Dr.GRPO's advantages without the std

    def __post_init__(self) -> None:
        if self.loss_type not in ("grpo", "dr_grpo", "dapo"):
            raise _bad("grpo.loss_type", "must be grpo, dr_grpo or dapo", self.loss_type)
        if self.scale_rewards not in ("group", "none"):
            raise _bad("grpo.scale_rewards", "must be group or none", self.scale_rewards)
        if self.beta < 0 or self.epsilon <= 0:
            raise ConfigError(f"grpo: beta must be >= 0 and epsilon > 0 (got {self.beta}, {self.epsilon})")


@dataclass
class PPOConfig:
    kl_coef: float = 0.05          # per-token KL penalty to the reference, folded into the rewards
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False

    def __post_init__(self) -> None:
        if self.kl_coef < 0 or self.clip_range <= 0 or self.clip_range_value <= 0 or self.vf_coef < 0:
            raise ConfigError("ppo: kl_coef and vf_coef must be >= 0, clip ranges > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"ppo: gamma and lam must be in [0, 1] (got {self.gamma}, {self.lam})")


@dataclass
class OnlineConfig:
    algo: Literal["grpo", "ppo"] = "grpo"
    run_dir: str = "runs/grpo"
    base: str = ""
    tokenizer: str = ""            # default: the base folder's
    method: Literal["full", "lora"] = "full"
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    steps: int = 20
    minibatch_size: int = 8
    grad_accum: int = 1
    ppo_epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "constant"
    grad_clip: float = 1.0
    log_every: int = 1
    eval_every: int = 0            # 0 = only at the end (and before the first step)
    ckpt_every: int = 0
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: dict[str, Any] = field(default_factory=dict)   # lmstack.finetune.lora.LoraConfig fields

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "ppo"):
            raise _bad("algo", "must be grpo or ppo", self.algo)
        if self.method not in ("full", "lora"):
            raise _bad("method", "must be full or lora", self.method)
        for name in ("steps", "minibatch_size", "grad_accum", "ppo_epochs", "log_every"):
            if getattr(self, name) < 1:
                raise _bad(name, "must be >= 1", getattr(self, name))
        if not self.lr > 0:
            raise _bad("lr", "must be > 0", self.lr)
        if self.algo == "grpo" and self.rollout.num_samples < 2:
            raise _bad("rollout.num_samples", "GRPO compares samples within a group: must be >= 2",
                       self.rollout.num_samples)
        buffer = self.rollout.prompts * self.rollout.num_samples
        per_step = self.minibatch_size * self.grad_accum
        if buffer % per_step:
            raise ConfigError(f"rollout.prompts * rollout.num_samples = {buffer} sequences per buffer is not a "
                              f"multiple of minibatch_size * grad_accum = {per_step}; change one of them")

    @property
    def buffer_size(self) -> int:
        return self.rollout.prompts * self.rollout.num_samples


def load_online_config(path: str | None, overrides: list[str] | None = None, algo: str | None = None
                       ) -> OnlineConfig:
    """A TOML/YAML/JSON config (+ ``--field value`` overrides); ``algo`` (the subcommand) wins over the file."""
    from lmstack.config import load_config

    base = {"algo": algo, "run_dir": f"runs/{algo}"} if algo else None
    cfg = load_config(OnlineConfig, path, list(overrides or []), base=base)
    if algo and cfg.algo != algo:
        raise ConfigError(f"algo: the config says {cfg.algo!r} but the command is 'align {algo}'; drop algo "
                          f"from the file")
    if not cfg.base:
        raise ConfigError("base: name the policy's model folder (e.g. a fine-tuned run), base = \"runs/sft\"")
    return cfg
