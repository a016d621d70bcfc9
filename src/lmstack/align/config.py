"""Configs of the offline alignment runs (``lmstack align rm|dpo|kto CONFIG``), importable without torch so a
bad config fails before any model loads. Every check names its field (one-line error, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmstack.errors import ConfigError
from lmstack.finetune.lora import LoraConfig

DPO_LOSSES = ("sigmoid", "ipo", "robust")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")          # the DPO run's reference-free loss types (no reference model)
PAIR_LOSSES = DPO_LOSSES + REFERENCE_FREE_LOSSES


@dataclass
class PreferenceDataConfig:
    """Where the preference (or unpaired) rows are and how they are cut."""

    train: list[str] = field(default_factory=list)     # JSONL/JSON/Parquet files, folders, globs
    valid: list[str] = field(default_factory=list)     # empty = hold out ``valid_fraction`` of train
    valid_fraction: float = 0.1
    max_len: int = 256                                  # tokens per rendered conversation
    max_examples: int | None = None                     # read at most this many rows of train
    max_valid: int | None = None                        # and of valid

    def __post_init__(self) -> None:
        if self.max_len < 4:
            raise ConfigError(f"data.max_len: must be >= 4, got {self.max_len}")
        if not 0.0 < self.valid_fraction < 0.9:
            raise ConfigError(f"data.valid_fraction: must be in (0, 0.9), got {self.valid_fraction}")


@dataclass
class AlignConfig:
    """What every offline run shares: the base model, the data, the optimisation, full or LoRA."""

    run_dir: str = "runs/align"
    base: str = ""                      # lmstack model folder / run dir, or a Hugging Face folder
    tokenizer: str = ""                 # tokenizer.json or folder; default: the base folder's
    method: Literal["full", "lora"] = "lora"
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    steps: int = 100
    batch_size: int = 8                 # pairs (or unpaired examples) per micro-batch
    grad_accum: int = 1
    lr: float | None = None             # None = full 5e-6 x 10 (tiny models), lora 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    log_every: int = 10
    eval_every: int = 0                 # 0 = only at the end
    ckpt_every: int = 0
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ConfigError(f"method: must be full or lora, got {self.method!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if not self.base:
            raise ConfigError("base: name the model folder to align (an SFT run's merged model, e.g. "
                              "runs/speedrun/chat_model)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"full": 5e-5}.get(self.method, 1e-3)


@dataclass
class RMConfig(AlignConfig):
    """A reward model: the base with a scalar head, trained with the Bradley-Terry loss on pairs."""

    run_dir: str = "runs/align/rm"
    method: Literal["full", "lora"] = "full"
    margin: float = 0.0                 # Llama 2's margin term: -log sigmoid(r_c - r_r - margin)
    bootstrap: int = 1000               # resamples for the held-out accuracy interval

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bootstrap < 10:
            raise ConfigError(f"bootstrap: must be >= 10 resamples, got {self.bootstrap}")


@dataclass
class DPOConfig(AlignConfig):
    """DPO / IPO / label-smoothed DPO against a frozen reference (see :func:`lmstack.align.dpo.dpo_loss`), or
    the reference-free SimPO and ORPO on the same pairs (:func:`~lmstack.align.dpo.simpo_loss`,
    :func:`~lmstack.align.dpo.orpo_odds_ratio`; ``beta`` is their beta / lambda)."""

    run_dir: str = "runs/align/dpo"
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "robust", "simpo", "orpo"] = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5            # SimPO's target reward margin
    precompute_ref: bool = True         # reference log-probs computed once per example before training

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if self.loss_type not in PAIR_LOSSES:
            raise ConfigError(f"loss_type: must be one of {', '.join(PAIR_LOSSES)}, got {self.loss_type!r}")
        if self.simpo_gamma < 0:
            raise ConfigError(f"simpo_gamma: must be >= 0, got {self.simpo_gamma}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class KTOConfig(AlignConfig):
    """KTO on desirable/undesirable examples (see :func:`lmstack.align.kto.kto_loss`)."""

    run_dir: str = "runs/align/kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size: KTO's KL estimate pairs each prompt with another example's "
                              "completion; use batch_size >= 2")
