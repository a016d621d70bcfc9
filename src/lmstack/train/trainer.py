"""The training loop: one loop for every objective and every torch.distributed strategy.

``pretrain(config)`` does the whole job and writes one run directory::

    RUN/config.json              the resolved TrainConfig
    RUN/data/{train,valid}/      token shards (when the inputs were text; shard folders are used in place)
    RUN/tokenizer.json           the tokenizer the data was encoded with
    RUN/metrics.jsonl            one row per log step (loss, lr, grad_norm, tokens/s, MFU) and per eval
    RUN/checkpoints/step_N/      model.safetensors + model_config.json, optimizer.pt, rng.pt, state.json
    RUN/model.safetensors        the final weights (+ model_config.json), loadable with lmstack.model.load
    RUN/loss.png, RUN/samples.md, RUN/summary.json

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences per data-parallel rank,
each loss divided by ``grad_accum`` before its backward (so the gradient is that of the mean loss over
the step), then unscale (fp16), clip, set the LR from the schedule, step. A checkpoint holds everything
the next step depends on: weights, AdamW moments, the step (the LR is a function of it), every rank's
RNG states and the loader position; so a resumed run computes the same losses as one that never
stopped (bit for bit on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmstack.config import to_dict
from lmstack.errors import ConfigError, DataError
from lmstack.runs import (JsonlLogger, Progress, atomic_dir, atomic_path, atomic_write_json, atomic_write_text,
                          checkpoint_dir, latest_checkpoint, list_checkpoints, prune_checkpoints, read_json)
from lmstack.runtime import (low_peak_warning, measure_matmul_peak, resolve_device, resolve_dtype, resolve_threads,
                             seed_everything)
from lmstack.train import distributed as D
from lmstack.train.config import TrainConfig
# the data, sample and plot helpers live in their modules; re-exported here for callers of the old paths
from lmstack.train.data import (RunData, byte_tokenizer, data_signature, load_train_tokenizer,  # noqa: F401
                                prepare_data, resolve_split)
from lmstack.train.objectives import (clm_loss, heldout_mean, heldout_sums, make_distill_loss_fn, make_loss_fn,
                                      special_ids, step_generator, tokens_per_example)
from lmstack.train.optim import build_optimizer, lr_at, set_lr
from lmstack.train.plots import plot_loss_curve
from lmstack.train.samples import render_samples, sample_text
from lmstack.train.strategy import Strategy, make_strategy

# ---------------------------------------------------------------------------------------------------------
# interruption


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after a checkpoint of the last completed step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Task:
    """The hook through which another layer trains in the one loop: ``Trainer(cfg, task=Task(...))``.

    What a task supplies, and what the trainer does with it:

    - ``model``: the module to train, built and placed by the task, with ``requires_grad`` set by its
      method (LoRA, prefix, adapters, full); the trainer builds no model and gives the optimizer only
      the parameters that require gradients. Its ``config`` (a ModelConfig) gives the vocabulary.
    - ``loader``: ``next_batch() -> (x, y)`` long tensors of shape (B, T), ``y = -100`` where no loss is
      taken, plus ``state_dict()`` / ``load_state_dict()`` so a checkpoint resumes at the next batch;
      the trainer counts ``x.numel()`` tokens per batch (batches may vary in length).
    - ``eval_batches()``: the held-out batches, the same ones each call; ``val_loss`` is their
      token-weighted CLM loss (:func:`lmstack.train.objectives.heldout_sums`), logged every
      ``eval_every`` steps and at the end, and it picks the best checkpoint.
    - ``tokenizer``: saved by the task itself (the trainer writes none), used for nothing else here.
    - ``save_weights(model, folder)`` / ``load_weights(model, folder)``: what checkpoints and the run
      folder hold (e.g. the adapter only) and how a resume reads it back; None = the whole model.

    - ``loss_fn(model, x, y, generator)``: the task's own loss in place of the objective's (alignment:
      DPO on preference pairs, a reward model's Bradley-Terry loss, a policy loss on rollouts). Then the
      loader's ``x``/``y`` may be dicts (or tuples) of tensors, moved to the device as they are; tokens
      are counted from the tensors whose key ends in ``input_ids``. It may return ``(loss, metrics)``:
      the metrics (scalars) are averaged over the accumulation's micro-batches and logged with the step's
      loss. ``eval_batches`` are then scored with it too.
    - ``evaluate(model) -> {name: float}``: held-out metrics computed by the task (pair accuracy, reward
      margin, exact match); replaces the ``eval_batches`` loss when given. A ``val_loss`` among them picks
      the best checkpoint.

    The trainer keeps the rest of the contract of :meth:`Trainer.fit`: the loss is the config's objective
    (``clm``) on ``(x, y)``, accumulation, mixed precision, clipping, the LR schedule, checkpoints of the
    optimizer, RNG and loader, exact resume, signals, metrics and the summary. Tasks run single-process
    (``dist.strategy = "none"``). The fine-tuning layer is the worked example: ``finetune/run.py`` builds
    the model with its method applied, an ``SFTLoader`` over tokenized chat examples, the held-out
    examples' batches, and save/load functions that write only the adapter.
    """

    model: nn.Module
    loader: Any
    eval_batches: Any                      # () -> iterable of (x, y)
    tokenizer: Any = None
    save_weights: Any = None               # (model, folder) -> None
    load_weights: Any = None               # (model, folder) -> None
    loss_fn: Any = None                    # (model, x, y, generator) -> loss | (loss, metrics); None = objective's
    evaluate: Any = None                   # (model) -> {name: float}; None = the eval_batches loss
    progress_metrics: tuple = ()           # names of loss_fn metrics also shown on the progress line


# config.json: what "auto" resolved to on the machine that ran (dtype, reason, threads); the config loader
# lives in train/config.py so that the CLI validates a config before importing torch
from lmstack.train.config import RESOLVED_KEY, load_train_config  # noqa: E402


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows, dropping a torn last line (a hard kill mid-write); a bad line elsewhere is an error."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"[train] {path}: dropping a torn last line", file=sys.stderr)
                break
            raise DataError(f"{path}: line {i + 1} is not JSON; fix or delete that line") from None
    return rows


def _earlier_checkpoint_hint(ckpt: Path) -> str:
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    if earlier:
        return f"delete {ckpt} to resume from the previous checkpoint ({earlier[-1].name})"
    return f"delete {ckpt} and train again from step 0"


def _load_checkpoint_file(ckpt: Path, name: str) -> Any:
    path = ckpt / name
    if not path.is_file():
        raise DataError(f"{path}: missing; {_earlier_checkpoint_hint(ckpt)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch each raise their own types
        raise DataError(f"{path}: corrupt ({type(e).__name__}); {_earlier_checkpoint_hint(ckpt)}") from None


def existing_run(run_dir: str | Path) -> str | None:
    """What makes ``run_dir`` a run already (checkpoints, a metrics log, a final model), or None."""
    run = Path(run_dir)
    if list_checkpoints(run):
        return "checkpoints"
    for name in ("metrics.jsonl", "model.safetensors"):
        if (run / name).is_file() and (run / name).stat().st_size:
            return name
    return None


# fields that change what is logged or kept, not what is trained
_COSMETIC = ("run_dir", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep_last", "sample_every",
             "sample_prompts", "sample_tokens", "tensorboard", "peak_tflops", "threads")


def config_fingerprint(cfg: TrainConfig, data_signature: Any = None) -> str:
    """A hash of everything in the config that changes the training trajectory (and of the data's shards)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in _COSMETIC} | {"data_signature": data_signature}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Holds the model, optimizer, loader and counters of one run; :meth:`fit` trains to ``cfg.steps``.

    Building one writes nothing into the run directory except the token-shard cache under ``RUN/data``
    (and reads the checkpoint it resumes from): ``config.json``, the tokenizer, the metrics log and the
    removal of a previous run's checkpoints all happen when :meth:`fit` starts.
    """

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, task: Task | None = None):
        self.cfg = cfg
        self.task = task
        self.run = Path(cfg.run_dir)
        self.env = D.init_distributed(cfg.dist, resolve_device(cfg.device))
        env = self.env
        self.device = env.device
        self.dtype_choice = resolve_dtype(cfg.dtype, self.device, announce=env.is_main)
        self.amp_dtype = self.dtype_choice.dtype
        self.threads = resolve_threads(cfg.threads)
        seed_everything(cfg.seed)

        if task is not None and env.strategy != "none":
            raise ConfigError("fine-tuning runs in one process: set dist.strategy = 'none'")
        if task is not None and cfg.init_from:
            raise ConfigError("init_from: a task supplies its own model; leave init_from empty")
        teacher, teacher_tok = self._load_teacher() if cfg.objective == "distill" else (None, None)
        init, init_tok = self._load_init(teacher) if cfg.init_from else (None, None)
        if task is not None:
            self.data = RunData(Path(), None, 0.0, task.model.config.vocab_size, task.tokenizer)
        else:
            # the data is tokenized with the tokenizer of the model it is fed to: the initial model's, else
            # the teacher's (the same vocabulary, checked in _load_init), else data.tokenizer
            tok, key = ((init_tok, f"init_from {Path(cfg.init_from).resolve()}") if init_tok is not None else
                        (teacher_tok, f"teacher {Path(cfg.teacher).resolve()}") if teacher_tok is not None else
                        (None, None))
            self.data = prepare_data(cfg, self.run, env, tok, key)
        self.fingerprint = config_fingerprint(cfg, data_signature(self.data) if task is None else None)
        seq_len = cfg.data.seq_len
        self.ids = special_ids(cfg.objective, self.data.vocab_size, seq_len, cfg.span_noise_density,
                               cfg.span_mean_length)
        self.model_cfg = (task.model.config if task is not None else self._init_config(init) if init is not None
                          else self._model_config(teacher))
        if teacher is not None:
            teacher.to(self.device)
            self.loss_fn = make_distill_loss_fn(teacher, cfg.kd_temperature, cfg.kd_alpha, cfg.kd_kind,
                                                cfg.kd_cache_topk)
            self.eval_loss_fn = clm_loss   # held out: the student's own next-token loss, comparable to the teacher's
        elif task is not None and task.loss_fn is not None:
            self.loss_fn = self.eval_loss_fn = task.loss_fn
        else:
            self.loss_fn = make_loss_fn(cfg.objective, self.ids, cfg.mlm_probability, cfg.span_noise_density,
                                        cfg.span_mean_length)
            self.eval_loss_fn = self.loss_fn

        from lmstack.model import build_model

        seed_everything(cfg.seed)  # the same initial weights on every rank and for every strategy
        model = task.model if task is not None else init if init is not None else build_model(self.model_cfg)
        self.n_params = model.num_parameters()
        self.n_params_non_embedding = model.num_parameters(exclude_embeddings=True)
        self.flops_per_token = model.flops_per_token(seq_len)
        if cfg.activation_checkpointing:
            D.apply_activation_checkpointing(model)
        model.to(self.device)
        self.strategy: Strategy = make_strategy(env, cfg.dist)
        self.strategy.wrap(model)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if cfg.compile:
            self.strategy.compile()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        from lmstack.data.loader import BlockLoader

        self.loader = task.loader if task is not None else BlockLoader(
            self.data.train, seq_len, cfg.batch_size, seed=cfg.seed, rank=env.dp_rank, world_size=env.dp_size,
            holdout=self.data.holdout)
        self.step = 0
        self.tokens = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.peak_flops = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
        self.resumed = self._resume(strict=resume is True) if resume else False
        self.log: JsonlLogger | None = None
        self.tb = None
        self._started = False
        self._stop_signal: int | None = None
        self._peak_raised = False

    # the parameters this rank owns, and what a forward is called on: the strategy's (settable, e.g. by a
    # benchmark that swaps in another implementation of the same model)
    @property
    def module(self) -> nn.Module:
        return self.strategy.module

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.strategy.module = value

    @property
    def forward_model(self) -> nn.Module:
        return self.strategy.forward_model

    @forward_model.setter
    def forward_model(self, value: nn.Module) -> None:
        self.strategy.forward_model = value

    def _start_run(self) -> None:
        """Write the run directory's start: config, tokenizer, a fresh or trimmed metrics log (main rank)."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            resolved = {**self.dtype_choice.as_dict(), "threads": self.threads}
            atomic_write_json(self.run / "config.json", {**to_dict(cfg), RESOLVED_KEY: resolved})
            if self.data.tokenizer is not None and self.task is None:
                self.data.tokenizer.save(self.run)
            if self.resumed:
                # metrics after the checkpoint will be recomputed: drop them so the log reads as one run
                rows = [r for r in read_metrics(self.run / "metrics.jsonl") if r.get("step", 0) <= self.step]
                atomic_write_text(self.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            else:
                for old in list_checkpoints(self.run):  # a fresh run must not resume from another run's files
                    import shutil

                    shutil.rmtree(old, ignore_errors=True)
        D.barrier(env)
        self.log = JsonlLogger(self.run / "metrics.jsonl", truncate=not self.resumed) if env.is_main else None
        self.tb = self._tensorboard() if cfg.tensorboard and env.is_main else None
        self._started = True

    # -- setup helpers --------------------------------------------------------------------------------
    def _load_teacher(self) -> tuple[nn.Module, Any]:
        """The frozen teacher of ``objective = "distill"`` and its tokenizer (which the student's data uses)."""
        from lmstack.infer.text import load_run

        teacher, tok = load_run(self.cfg.teacher, device="cpu")
        if teacher.config.arch != "decoder":
            raise ConfigError(f"teacher: {self.cfg.teacher} is a {teacher.config.arch!r} model; distillation "
                              f"needs a causal LM (decoder) teacher")
        # the soft targets are distributions over the teacher's vocabulary: the student predicts the same one
        explicit, tv = self.cfg.model.get("vocab_size"), teacher.config.vocab_size
        if explicit is not None and explicit != tv:
            raise ConfigError(f"model.vocab_size={explicit}, but the teacher {self.cfg.teacher} has vocab_size={tv}; "
                              f"distillation needs the same vocabulary (drop model.vocab_size or set it to {tv})")
        return teacher, tok

    def _load_init(self, teacher: nn.Module | None) -> tuple[nn.Module, Any]:
        """The model ``init_from`` names (weights and config, in fp32, trainable) and its tokenizer."""
        from lmstack.compress.quantize import quantized_layers
        from lmstack.infer.text import load_run

        cfg = self.cfg
        if (Path(cfg.init_from) / "adapter_config.json").is_file():
            raise ConfigError(f"init_from: {cfg.init_from} is an adapter run; merge it first "
                              f"(lmstack finetune merge) and pass the merged folder")
        model, tok = load_run(cfg.init_from, device="cpu")
        if quantized_layers(model):
            raise ConfigError(f"init_from: {cfg.init_from} is a quantized model; training needs float weights "
                              f"(start from the float model, or lmstack.compress.dequantize_model it first)")
        if model.config.arch != "decoder":
            raise ConfigError(f"init_from: {cfg.init_from} is a {model.config.arch!r} model; objective "
                              f"{cfg.objective!r} trains a causal LM (decoder)")
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"init_from: {cfg.init_from} has vocab_size={model.config.vocab_size}, the teacher "
                              f"{cfg.teacher} has {teacher.config.vocab_size}; distillation needs one vocabulary")
        for p in model.parameters():
            p.requires_grad_(True)
        return model.float().train(), tok

    def _init_config(self, init: nn.Module):
        """The initial model's config, checked against what the data needs."""
        cfg, mcfg = self.cfg, init.config
        if self.ids.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"init_from: {cfg.init_from} has vocab_size={mcfg.vocab_size}, fewer than its "
                              f"tokenizer's {self.ids.vocab_size} ids")
        if cfg.data.seq_len > mcfg.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the max_seq_len={mcfg.max_seq_len} "
                              f"of init_from {cfg.init_from}; set data.seq_len <= {mcfg.max_seq_len}")
        return mcfg

    def _model_config(self, teacher: nn.Module | None = None):
        cfg = self.cfg
        explicit = cfg.model.get("vocab_size")
        if teacher is not None:  # the student's vocab is the teacher's (checked against model.vocab_size already)
            tv = teacher.config.vocab_size
            if self.ids.vocab_size > tv:
                raise ConfigError(f"teacher: {cfg.teacher} has vocab_size={tv}, fewer than its tokenizer's "
                                  f"{self.ids.vocab_size} ids")
            explicit = tv
        if explicit is not None and explicit < self.ids.vocab_size:
            raise ConfigError(f"model.vocab_size={explicit} is smaller than the data needs ({self.ids.vocab_size}: "
                              f"{self.data.vocab_size} token ids + the objective's extra ids)")
        mcfg = cfg.model_config(vocab_size=explicit or self.ids.vocab_size)
        if cfg.data.seq_len > mcfg.max_seq_len and mcfg.pos == "learned":
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={mcfg.max_seq_len}")
        if mcfg.max_seq_len < cfg.data.seq_len:
            mcfg = mcfg.replace(max_seq_len=cfg.data.seq_len)
        return mcfg

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard = true needs the tensorboard package (pip install tensorboard)") from None
        return SummaryWriter(str(self.run / "tensorboard"))

    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- one optimizer step ----------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one optimizer step; returns (mean loss on this rank, gradient norm)."""
        cfg, env = self.cfg, self.env
        self.module.train()
        step = self.step
        loss, tokens = self.strategy.forward_backward(
            self.loader.next_batch, self.loss_fn, cfg.grad_accum,
            lambda micro: step_generator(cfg.seed, step, micro, env.dp_rank), self.autocast, self.scaler.scale,
            self.device)
        self.scaler.unscale_(self.optimizer)
        norm = self.strategy.clip(self.params, cfg.optim.grad_clip)
        set_lr(self.optimizer, lr_at(self.step, cfg.steps, cfg.optim))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # fine-tuning batches vary in length: count what went in; packed blocks are all the same size
        per_step = cfg.batch_size * cfg.grad_accum * cfg.data.seq_len * env.dp_size
        self.tokens += tokens if self.task is not None else per_step
        return loss, norm

    # -- evaluation and samples ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss over up to ``eval_batches`` batches (the same batches every time), token-weighted
        (:func:`lmstack.train.objectives.heldout_sums`), and its perplexity."""
        from lmstack.data.loader import validation_batches

        cfg, env, strategy = self.cfg, self.env, self.strategy
        split = strategy.shards_eval_batches  # collective forwards (fsdp, tp, pp) need every rank on every batch
        if self.task is not None and self.task.evaluate is not None:
            self.module.eval()
            with self.autocast():
                metrics = {k: float(v) for k, v in self.task.evaluate(strategy.eval_model()).items()}
            self.module.train()
            if "val_loss" in metrics and "val_ppl" not in metrics and self.task.loss_fn is None:
                metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
            return metrics
        if self.task is not None:
            batches = self.task.eval_batches()
        elif not self.data.has_valid:
            return {}
        else:
            source = self.data.valid if self.data.valid is not None else self.data.train
            batches = validation_batches(source, cfg.data.seq_len, cfg.batch_size, holdout=self.data.holdout,
                                         max_batches=cfg.eval_batches, rank=env.dp_rank if split else 0,
                                         world_size=env.dp_size if split else 1)

        def batch_loss(i: int, x: torch.Tensor, y: torch.Tensor) -> float | None:
            if not strategy.can_eval(x):
                return None
            return strategy.eval_loss(x, y, self.eval_loss_fn, step_generator(cfg.seed, -1, i), self.autocast)

        self.module.eval()
        total = heldout_sums(batches, batch_loss, self.device)
        if split and env.distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
        self.module.train()
        val = heldout_mean(total)
        if val is None:
            return {}
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def samples(self, model: nn.Module | None = None) -> list[dict[str, str]]:
        """Generations from ``sample_prompts`` (decoder models, main rank)."""
        cfg = self.cfg
        if self.model_cfg.arch != "decoder" or not cfg.sample_prompts or not self.env.is_main:
            return []
        model = model if model is not None else self.module
        tok = self.data.tokenizer
        was_training = model.training
        model.eval()
        out = []
        with self.autocast():
            for i, prompt in enumerate(cfg.sample_prompts):
                out.append({"prompt": prompt, "text": sample_text(model, tok, prompt, cfg.sample_tokens, self.device,
                                                                   seed=cfg.seed + i)})
        model.train(was_training)
        return out

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (collective: every rank must call it)."""
        env = self.env
        model_state = self.strategy.full_state()
        optim_state = self.strategy.optimizer_state(self.optimizer)
        rng = D.gather_objects(_rng_state(), env)
        path = checkpoint_dir(self.run, self.step)
        if env.is_main:
            with atomic_dir(path) as tmp:
                self._save_weights(model_state, tmp)
                with atomic_path(tmp / "optimizer.pt") as f:
                    torch.save({"optimizer": optim_state, "scaler": self.scaler.state_dict()}, f)
                with atomic_path(tmp / "rng.pt") as f:
                    torch.save(rng, f)
                atomic_write_json(tmp / "state.json", {
                    "step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                    "best_val": self.best_val, "best_step": self.best_step, "strategy": env.strategy,
                    "world_size": env.world_size, "seed": self.cfg.seed,
                    "fingerprint": self.fingerprint})
            best = (checkpoint_dir(self.run, self.best_step),) if self.best_step is not None else ()
            prune_checkpoints(self.run, max(1, self.cfg.keep_last), keep=best)
        D.barrier(env)
        return path if env.is_main else None

    def _save_weights(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        from lmstack.model import build_model, save

        if self.task is not None and self.task.save_weights is not None:
            self.task.save_weights(self.module, folder)
            return
        if self.strategy.holds_whole_model:
            save(self.module, folder)
            return
        export = build_model(self.model_cfg)
        export.load_state_dict(state)
        save(export, folder)

    def full_model(self) -> nn.Module | None:
        """The trained model as one ordinary module on the main rank (gathered from shards or stages)."""
        if self.strategy.holds_whole_model:
            return self.module if self.env.is_main else None
        state = self.strategy.full_state()
        if not self.env.is_main:
            return None
        from lmstack.model import build_model

        export = build_model(self.model_cfg)
        export.load_state_dict(state)
        return export.to(self.device)

    def _resume(self, strict: bool) -> bool:
        """Load the newest checkpoint; False when there is none (or, unless ``strict``, when it was written
        with a different training config, so an automatic resume never mixes two configs)."""
        ckpt = latest_checkpoint(self.run)
        if ckpt is None:
            if self.env.is_main:
                print(f"[train] {self.run}: no checkpoint, starting from step 0", file=sys.stderr)
            return False
        try:
            state = read_json(ckpt / "state.json")
        except (OSError, ValueError) as e:
            raise DataError(f"{ckpt / 'state.json'}: unreadable ({type(e).__name__}); "
                            f"{_earlier_checkpoint_hint(ckpt)}") from None
        env = self.env
        if not strict and state.get("fingerprint") != self.fingerprint:
            if env.is_main:
                print(f"[train] {ckpt} was written with another config: starting from step 0", file=sys.stderr)
            return False
        if state["world_size"] != env.world_size or state["strategy"] != env.strategy:
            raise ConfigError(f"{ckpt}: written by {state['world_size']} process(es) with strategy "
                              f"{state['strategy']!r}; resume with the same launch (now {env.world_size}, "
                              f"{env.strategy!r})")
        from safetensors.torch import load_model

        from lmstack.model import build_model

        if self.task is not None and self.task.load_weights is not None:
            self.task.load_weights(self.module, ckpt)
        else:
            full = build_model(self.model_cfg)
            weights = ckpt / "model.safetensors"
            if not weights.is_file():
                raise DataError(f"{weights}: missing; {_earlier_checkpoint_hint(ckpt)}")
            try:
                load_model(full, str(weights))
            except RuntimeError as e:
                raise ConfigError(f"{ckpt}: the checkpoint does not fit this run's model config "
                                  f"({str(e).splitlines()[0]})") from None
            except Exception as e:  # safetensors' own error types for a truncated or foreign file
                raise DataError(f"{weights}: not a readable safetensors file ({type(e).__name__}); "
                                f"{_earlier_checkpoint_hint(ckpt)}") from None
            self.strategy.load_full_state(full.state_dict())
        blob = _load_checkpoint_file(ckpt, "optimizer.pt")
        try:
            self.strategy.load_optimizer_state(self.optimizer, blob["optimizer"])
            self.scaler.load_state_dict(blob["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{ckpt / 'optimizer.pt'}: does not hold this run's optimizer state "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"{_earlier_checkpoint_hint(ckpt)}") from None
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_val, self.best_step = state.get("best_val"), state.get("best_step")
        rng = _load_checkpoint_file(ckpt, "rng.pt")
        _set_rng_state(rng[env.rank])
        if env.is_main:
            print(f"[train] resumed from {ckpt} (step {self.step})", file=sys.stderr)
        return True

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps`` (or stop after step ``until`` without a checkpoint, as a crash would).

        SIGINT (Ctrl-C) and SIGTERM finish the step under way, write a checkpoint of it and raise
        :class:`Interrupted`; a second signal quits at once without one. The handlers and the CPU thread
        count are set for the duration of ``fit`` only.
        """
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        handlers = self._install_signal_handlers()
        try:
            return self._fit(until)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            torch.set_num_threads(threads_before)

    def _install_signal_handlers(self) -> dict[int, Any]:
        # several processes must agree on the step they stop at: under torchrun a signal ends the run without
        # a checkpoint (resume from the newest periodic one); signal handlers exist only on the main thread
        if self.env.distributed or threading.current_thread() is not threading.main_thread():
            return {}
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:   # the second one: stop now, mid-step, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(f"\n[train] {signal.Signals(signum).name}: finishing step {self.step + 1} and saving a checkpoint "
                  f"(send it again to quit at once, without one)", file=sys.stderr)

        for signum in previous:
            signal.signal(signum, on_signal)
        return previous

    def _stop_if_signalled(self) -> None:
        """At a step boundary after a signal: checkpoint the last completed step (unless saved already), stop."""
        signum = self._stop_signal
        if signum is None:
            return
        path: Path | None = checkpoint_dir(self.run, self.step)
        if not path.is_dir():
            path = self.save_checkpoint() if self.step > 0 else None
        where = f"checkpoint {path}" if path else "no checkpoint (no step completed)"
        print(f"[train] stopped at step {self.step}: {where}; continue with `lmstack train resume {self.run}`",
              file=sys.stderr)
        raise Interrupted(signum, self.step, path)

    def _measure_peak(self) -> float:
        peak = measure_matmul_peak(self.device, self.amp_dtype)
        if self.device.type == "cpu" and self.amp_dtype == torch.float32:
            warning = low_peak_warning(peak, self.threads)
            if warning and self.env.is_main:
                print(f"[train] warning: {warning}", file=sys.stderr)
        return peak

    def _fit(self, until: int | None) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if not self._started:
            self._start_run()
        if self.peak_flops is None:  # the peak of the dtype the matmuls run in (bf16's when autocasting to it)
            self.peak_flops = self._measure_peak()
        start_step, t_start = self.step, time.perf_counter()
        self._stop_if_signalled()
        # counts this run's steps only: its rate and ETA must not include the steps before a resume
        progress = Progress(cfg.steps - start_step, desc=f"train (from step {start_step})" if start_step else "train",
                            unit="step", disable=not env.is_main)
        tok_per_step = cfg.batch_size * cfg.grad_accum * env.dp_size * tokens_per_example(
            cfg.objective, cfg.data.seq_len, cfg.span_noise_density, cfg.span_mean_length)
        last_t, last_step, last_tokens = time.perf_counter(), self.step, self.tokens
        record: dict[str, Any] = {}
        try:
            while self.step < cfg.steps:
                loss, norm = self.train_step()
                step = self.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss_v = D.all_reduce_mean(loss, env).item()
                    now = time.perf_counter()
                    done = (self.tokens - last_tokens if self.task is not None
                            else tok_per_step * (step - last_step))
                    tps = done / max(now - last_t, 1e-9)
                    last_t, last_step, last_tokens = now, step, self.tokens
                    achieved = self.flops_per_token * tps / env.world_size
                    if achieved > self.peak_flops:
                        # the square-matmul probe missed a faster kernel path: the peak is at least what ran
                        if env.is_main and not self._peak_raised:
                            print(f"[train] note: step {step} ran {achieved / 1e12:.3g} TFLOP/s per process, "
                                  f"above the measured peak {self.peak_flops / 1e12:.3g}; using it as the peak",
                                  file=sys.stderr)
                        self.peak_flops, self._peak_raised = achieved, True
                    mfu = achieved / self.peak_flops
                    record = {"step": step, "loss": loss_v, "lr": lr_at(step - 1, cfg.steps, cfg.optim),
                              "grad_norm": float(norm), "tokens": self.tokens, "tokens_per_s": round(tps, 1),
                              "mfu": round(mfu, 6), "elapsed": round(now - t_start, 2),
                              **self.strategy.step_metrics}
                    if not math.isfinite(loss_v):
                        raise DataError(f"step {step}: the loss is {loss_v}; lower optim.lr or check the data")
                    self._log(record)
                    # a task's own metrics (alignment: rewards, margin, accuracy) ride on the progress line too:
                    # those it names in progress_metrics, else all of them
                    named = self.task.progress_metrics if self.task is not None else ()
                    shown = {k: v for k, v in self.strategy.step_metrics.items() if not named or k in named}
                    progress.update(0, loss=loss_v, tok_s=int(tps), mfu=f"{mfu:.1%}", **shown)
                progress.update(1)
                at_end = step == cfg.steps
                new_best = False
                if (cfg.eval_every and step % cfg.eval_every == 0) or at_end:
                    ev = self.evaluate()
                    if ev:
                        self._log({"step": step, **ev})
                        if "val_loss" in ev and (self.best_val is None or ev["val_loss"] < self.best_val):
                            self.best_val, self.best_step, new_best = ev["val_loss"], step, True
                if cfg.sample_every and step % cfg.sample_every == 0 and self.strategy.holds_whole_model:
                    for s in self.samples():
                        self._log({"step": step, "sample_prompt": s["prompt"], "sample": s["text"]})
                if until is not None and step >= until:
                    return {"stopped_at": step}
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or new_best or at_end:
                    self.save_checkpoint()
                if not at_end:
                    self._stop_if_signalled()
        except KeyboardInterrupt as e:
            if not isinstance(e, Interrupted) and env.is_main:
                # mid-step state is not a consistent checkpoint: the newest saved one stays the resume point
                print(f"\n[train] interrupted during step {self.step + 1}: no checkpoint written; "
                      f"`lmstack train resume {self.run}` continues from the newest one", file=sys.stderr)
            raise
        finally:
            progress.close()
        return self._finish(time.perf_counter() - t_start, start_step, record)

    def _log(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.log(record)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def _finish(self, seconds: float, start_step: int, last: dict[str, Any]) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        final = self.full_model()
        summary: dict[str, Any] = {}
        if env.is_main:
            from lmstack.model import save

            if self.task is not None and self.task.save_weights is not None:
                self.task.save_weights(final, self.run)
            else:
                save(final, self.run)
            samples = self.samples(final)
            rows = read_metrics(self.run / "metrics.jsonl")
            evals = [r for r in rows if "val_loss" in r]
            steps_run = self.step - start_step
            tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > start_step + 1]
            summary = {
                "run_dir": str(self.run), "objective": cfg.objective, "strategy": env.strategy,
                "world_size": env.world_size, "steps": self.step, "tokens": self.tokens,
                "params_total": self.n_params, "params_non_embedding": self.n_params_non_embedding,
                "flops": self.flops_per_token * self.tokens, "seconds": round(seconds, 2),
                "train_loss": last.get("loss"), "val_loss": evals[-1]["val_loss"] if evals else None,
                "val_ppl": evals[-1].get("val_ppl") if evals else None, "best_val_loss": self.best_val,
                "eval": {k: v for k, v in evals[-1].items() if k not in ("step", "time")} if evals else {},
                "best_step": self.best_step,
                "tokens_per_s": round(statistics.median(tps), 1) if tps else last.get("tokens_per_s"),
                "mfu": last.get("mfu"), "peak_tflops": round(self.peak_flops / 1e12, 3), "steps_this_run": steps_run,
                "dtype": self.dtype_choice.name, "dtype_reason": self.dtype_choice.reason, "threads": self.threads,
                "samples": samples, "loss_curve": str(self.run / "loss.png"),
            }
            plot_loss_curve(rows, self.run / "loss.png")
            atomic_write_text(self.run / "samples.md", render_samples(samples))
            atomic_write_json(self.run / "summary.json", summary)
        D.barrier(env)
        return summary

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.tb is not None:
            self.tb.close()
        D.shutdown(self.env)


# ---------------------------------------------------------------------------------------------------------
# public entry points


def pretrain(config: TrainConfig, resume: bool | str = False, until: int | None = None) -> dict[str, Any]:
    """Train a model as ``config`` says and write the run directory (see the module docstring).

    ``resume=True`` continues from the newest checkpoint in ``config.run_dir`` (from scratch if none);
    ``resume="auto"`` does so only if that checkpoint was written with the same training config (the
    fields that change the trajectory), else starts afresh: what a resumable pipeline stage wants.
    Under ``torchrun`` every process calls this; the summary is returned on rank 0 (``{}`` elsewhere).
    """
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.fit(until=until)
    finally:
        trainer.close()


def resume_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest checkpoint, with its saved config (+ overrides,
    e.g. ``["--steps", "2000"]`` to train longer)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise DataError(f"{run_dir}: no config.json; is this a training run directory?")
    cfg = load_train_config(run_dir / "config.json", list(overrides or []) + ["--run_dir", str(run_dir)])
    return pretrain(cfg, resume=True)
