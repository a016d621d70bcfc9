"""The trainer's typed config: one ``TrainConfig`` with small sections, validated on construction.

A TOML file maps onto it section by section (see ``configs/train_tiny.toml``)::

    run_dir = "runs/tiny"
    steps = 300
    [model]            # a preset name plus any ModelConfig field
    preset = "tiny"
    n_layer = 2
    [optim]
    lr = 3e-3
    [data]
    train = "runs/speedrun/corpus/train.jsonl"

and every field can be overridden on the command line (``--optim.lr 1e-3 --model.n_layer 2``).
"""

from __future__ import annotations

import difflib
import os
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import ConfigError

OBJECTIVES = ("clm", "mlm", "span", "distill")
STRATEGIES = ("none", "ddp", "fsdp", "tp", "pp")


def _finite(name: str, value: float) -> None:
    # nan passes every comparison-based range check (nan <= 0 is False): test it first
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value}")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on matrices only, a warmup, then cosine or WSD decay."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1           # final LR = lr * min_lr_ratio
    weight_decay: float = 0.1           # applied to >= 2-D weights (matmuls, embeddings), never to norms/biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2         # WSD: the last fraction of steps that decays (linearly) to min_lr
    grad_clip: float = 1.0              # max global gradient norm; 0 disables clipping
    fused: bool | None = None           # None = fused AdamW where the device supports it

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "decay_fraction", "grad_clip"):
            _finite(f"optim.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps: must be positive, got {self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0, got {self.grad_clip}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass
class DataConfig:
    """Where the token blocks come from.

    ``train``/``valid`` are either a folder of packed shards (``lmstack data prepare``) or text inputs
    (files, folders, globs of .txt/.md/.jsonl/.parquet) that are tokenized into ``RUN/data/`` first.
    ``tokenizer`` is a ``tokenizer.json`` (or a folder holding one) for text inputs and for the samples;
    ``"bytes"`` uses UTF-8 bytes (vocab 257 with EOS), which needs no trained tokenizer.
    """

    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    tokenizer: str = "bytes"
    text_field: str = "text"
    seq_len: int = 256
    # text inputs without ``valid``: the documents held out of ``train`` for validation, by the one rule
    # lmstack.data.split.is_heldout(text, valid_fraction, split_seed) (a shard folder: its last blocks)
    valid_fraction: float = 0.05
    # the held-out rule's seed; not ``seed`` (runs of any seed share a split) and not the data layer's 0: a
    # train split that rule made holds no document it would hold out again
    split_seed: int = 1
    workers: int = 2                     # tokenizer processes for text inputs

    def __post_init__(self) -> None:
        _finite("data.valid_fraction", self.valid_fraction)
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2, got {self.seq_len}")
        if self.workers < 1:
            raise ConfigError(f"data.workers: must be >= 1, got {self.workers}")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ConfigError(f"data.valid_fraction: must be in [0, 0.5), got {self.valid_fraction}")


@dataclass
class DistConfig:
    """torch.distributed scale-out; the world comes from ``torchrun`` (one process when launched plainly)."""

    strategy: Literal["none", "ddp", "fsdp", "tp", "pp"] = "none"
    backend: str = "auto"                # auto: nccl on CUDA, gloo otherwise
    reshard_after_forward: bool = True   # FSDP2: True = ZeRO-3, False = ZeRO-2 (params stay gathered fwd->bwd)
    pp_microbatches: int = 4             # pipeline: micro-batches per step (must divide batch_size)
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"dist.strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.pp_microbatches < 1:
            raise ConfigError(f"dist.pp_microbatches: must be >= 1, got {self.pp_microbatches}")


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    seed: int = 1337
    device: str = "auto"
    # autocast dtype; auto = bf16 where bf16 matmuls are really fast (CUDA with bf16, a CPU with AMX or
    # AVX512-BF16 that a probe confirms), else fp32 (lmstack.runtime.resolve_dtype)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # CPU threads while training: auto = $OMP_NUM_THREADS if set, else the cores this process may run on
    threads: int | Literal["auto"] = "auto"
    objective: Literal["clm", "mlm", "span", "distill"] = "clm"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    steps: int = 200                     # optimizer steps
    batch_size: int = 8                  # sequences per micro-batch (per data-parallel rank)
    grad_accum: int = 1                  # micro-batches per optimizer step
    log_every: int = 10
    eval_every: int = 100                # 0 = only at the end
    eval_batches: int = 20
    ckpt_every: int = 100                # 0 = only at the end
    keep_last: int = 2                   # checkpoints kept besides the best one
    sample_every: int = 0                # 0 = samples only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["The ", "def "])
    sample_tokens: int = 48
    activation_checkpointing: bool = False
    compile: bool = False
    peak_tflops: float = 0.0             # device peak for MFU; 0 = measure the matmul peak at start
    tensorboard: bool = False
    mlm_probability: float = 0.15        # masked LM: fraction of tokens predicted
    span_noise_density: float = 0.15     # span corruption: fraction of tokens in corrupted spans
    span_mean_length: float = 3.0
    # objective = "distill": a causal LM student learns from ``teacher``'s soft targets (Hinton et al. 2015)
    teacher: str = ""                    # a model folder or run directory (lmstack.infer.text.load_run's rules)
    kd_temperature: float = 2.0          # softmax temperature of both distributions
    kd_alpha: float = 0.5                # weight of the soft (KL) term; 1 - alpha on the hard-label loss
    kd_kind: Literal["forward", "reverse"] = "forward"   # KL(teacher || student), or the reverse (MiniLLM)
    # > 0: the teacher's top-k logits per training block are computed once and reused (forward KL over the
    # teacher's top k, renormalised; lmstack.train.objectives.kd_loss_topk); 0 = the teacher runs every step
    kd_cache_topk: int = 0
    # start from a trained model instead of random weights: a model folder or run directory
    # (lmstack.infer.text.load_run's rules: lmstack, Hugging Face, a pruned folder); its config and tokenizer
    # replace the ``model`` section and ``data.tokenizer``. Recovery fine-tuning of a pruned model, and a
    # distilled student initialised from a pruned teacher (prune -> distill), start this way.
    init_from: str = ""
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        from lmstack.config import from_dict

        for name, cls in (("optim", OptimConfig), ("data", DataConfig), ("dist", DistConfig)):
            if isinstance(getattr(self, name), dict):  # TrainConfig(data={"train": [...]}) from Python
                setattr(self, name, from_dict(cls, getattr(self, name), prefix=f"{name}."))
        for name in ("peak_tflops", "mlm_probability", "span_noise_density", "span_mean_length", "kd_temperature",
                     "kd_alpha"):
            _finite(name, getattr(self, name))
        if self.threads != "auto" and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                       or self.threads < 1):
            raise ConfigError(f"threads: must be 'auto' or a positive integer, got {self.threads!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "keep_last", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability: must be in (0, 1), got {self.mlm_probability}")
        if not 0.0 < self.span_noise_density < 1.0:
            raise ConfigError(f"span_noise_density: must be in (0, 1), got {self.span_noise_density}")
        if self.span_mean_length < 1.0:
            raise ConfigError(f"span_mean_length: must be >= 1, got {self.span_mean_length}")
        if self.objective == "distill" and not self.teacher:
            raise ConfigError("teacher: objective 'distill' needs a teacher model folder (--teacher DIR)")
        if self.init_from and self.model not in ({}, {"preset": "tiny"}):
            raise ConfigError(f"model: init_from={self.init_from!r} takes the model's config from that folder; "
                              f"drop the [model] section (got {sorted(self.model)})")
        if self.init_from and self.objective not in ("clm", "distill"):
            raise ConfigError(f"init_from: objective {self.objective!r} is not supported; init_from continues a "
                              f"causal LM (objective clm or distill)")
        if self.kd_cache_topk < 0:
            raise ConfigError(f"kd_cache_topk: must be >= 0, got {self.kd_cache_topk}")
        if self.kd_cache_topk and self.kd_kind != "forward":
            raise ConfigError("kd_cache_topk: the top-k cache serves kd_kind = 'forward' only (reverse KL needs the "
                              "teacher's whole distribution); set kd_cache_topk = 0")
        if self.kd_temperature <= 0:
            raise ConfigError(f"kd_temperature: must be positive, got {self.kd_temperature}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ConfigError(f"kd_alpha: must be in [0, 1], got {self.kd_alpha}")
        if self.dist.strategy == "pp" and self.objective == "distill":
            raise ConfigError("objective: distill does not run under pipeline parallelism; use dist.strategy "
                              "none, ddp, fsdp or tp")
        if self.dist.strategy == "pp" and self.grad_accum != 1:
            raise ConfigError("grad_accum: pipeline parallelism accumulates through dist.pp_microbatches; "
                              "set grad_accum = 1")
        if self.peak_tflops < 0:
            raise ConfigError(f"peak_tflops: must be >= 0, got {self.peak_tflops}")
        if not isinstance(self.model, dict):
            raise ConfigError("model: expected a section with a preset name and ModelConfig fields")
        if self.dist.strategy == "pp" and self.batch_size % self.dist.pp_microbatches:
            raise ConfigError(f"dist.pp_microbatches: must divide batch_size={self.batch_size}, "
                              f"got {self.dist.pp_microbatches}")
        self.model_config()  # fail early on an unknown model field or preset

    def model_config(self, vocab_size: int | None = None):
        """The ModelConfig this run trains: the preset, then the section's fields, then the data's vocab."""
        from lmstack.model import ModelConfig, preset

        fields = dict(self.model)
        name = fields.pop("preset", None)
        arch = {"clm": "decoder", "distill": "decoder", "mlm": "encoder", "span": "encoder-decoder"}[self.objective]
        fields.setdefault("arch", arch)
        if fields["arch"] != arch:
            raise ConfigError(f"model.arch: objective {self.objective!r} trains a {arch!r} model, "
                              f"got {fields['arch']!r}")
        if arch == "encoder":
            fields.setdefault("mlm_head", True)
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        known = list(ModelConfig.__dataclass_fields__)
        for key in fields:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean 'model.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config field 'model.{key}'{hint}")
        try:
            return preset(name, **fields) if name else ModelConfig(**fields)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None


RESOLVED_KEY = "_resolved"   # config.json: what "auto" resolved to on the machine that ran (dtype, reason, threads)


def load_train_config(path: "str | os.PathLike", overrides: list[str] | None = None) -> TrainConfig:
    """A ``TrainConfig`` from a config file (a run's ``config.json`` too: its resolved-settings record is
    ignored), then ``overrides``. Validation happens here, before anything is written."""
    from lmstack.config import load_config, read_config_file

    data = read_config_file(path)
    if isinstance(data, dict):
        data.pop(RESOLVED_KEY, None)
    return load_config(TrainConfig, None, overrides, base=data)
