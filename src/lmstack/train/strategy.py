"""How one training run is split over processes, behind one small object, so the loop has no branches.

``Trainer.fit()``, ``train_step()``, ``evaluate()``, the checkpoints, ``full_model()`` and the resume talk to a
:class:`Strategy` only (no ``env.strategy`` branches there):

- ``wrap(model)``: place the model (DDP replica, FSDP2 shards, TP shards, or this rank's pipeline stage);
  afterwards ``module`` holds the parameters this rank owns (what the optimizer sees and checkpoints
  gather) and ``forward_model`` is what a forward is called on;
- ``forward_backward(next_batch, loss_fn, ...)``: one optimizer step's forwards and backwards (all
  micro-batches of an accumulation, or one pipeline schedule), returning the mean loss and the input
  tokens it saw (a loss function may return ``(loss, metrics)``: their micro-batch means are left in
  ``step_metrics`` for the log);
- ``eval_loss(x, y, loss_fn, ...)``: the mean loss of one held-out batch (collective where needed);
- ``clip(params, max_norm)``: the global gradient norm, clipped;
- ``full_state()`` / ``load_full_state()`` and ``optimizer_state()`` / ``load_optimizer_state()``: the
  canonical single-process layout, whatever the split, so checkpoints move between strategies' layouts
  only through one format;
- ``holds_whole_model``: whether ``module`` is an ordinary full model (none, ddp), else the trainer
  rebuilds one from ``full_state()`` to save or sample.

The maths of each strategy lives in :mod:`lmstack.train.distributed`; this module only chooses which of
its functions a step calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train import distributed as D
from lmstack.train.config import DistConfig
from lmstack.train.objectives import count_tokens, split_loss, to_device
from lmstack.train.optim import clip_grad_norm

Batch = tuple[torch.Tensor, torch.Tensor]


class Strategy:
    """One process holds the whole model (``dist.strategy = "none"``); also the base of the others."""

    holds_whole_model = True
    shards_eval_batches = False          # does each rank evaluate its own slice of the held-out batches

    def __init__(self, env: D.DistEnv, cfg: DistConfig):
        self.env = env
        self.cfg = cfg
        self.module: nn.Module | None = None
        self.forward_model: nn.Module | None = None
        self.step_metrics: dict[str, float] = {}   # the task metrics of the last step, micro-batch means

    # -- placing the model --------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, loss_fn: Callable | None = None) -> None:
        self.module = model
        self.forward_model = model

    def compile(self) -> None:
        self.forward_model = torch.compile(self.forward_model)

    # -- one step ---------------------------------------------------------------------------------------
    def forward_backward(self, next_batch: Callable[[], Batch], loss_fn: Callable, grad_accum: int,
                         generator_for: Callable[[int], torch.Generator], autocast: Callable[[], Any],
                         scale: Callable[[torch.Tensor], torch.Tensor], device: torch.device
                         ) -> tuple[torch.Tensor, int]:
        """Forwards and backwards of ``grad_accum`` micro-batches; (mean loss, input tokens seen)."""
        loss = torch.zeros((), device=device)
        tokens = 0
        metrics: dict[str, torch.Tensor] = {}
        for micro in range(grad_accum):
            x, y = next_batch()
            x, y = to_device(x, device), to_device(y, device)
            with self.no_sync(last=micro == grad_accum - 1):
                with autocast():
                    micro_loss, micro_metrics = split_loss(loss_fn(self.forward_model, x, y, generator_for(micro)))
                scale(micro_loss / grad_accum).backward()
            loss += micro_loss.detach()
            for name, value in micro_metrics.items():
                metrics[name] = metrics.get(name, 0.0) + torch.as_tensor(value).detach().float() / grad_accum
            tokens += count_tokens(x)
        self.step_metrics = {name: float(v) for name, v in metrics.items()}
        return loss / grad_accum, tokens

    def no_sync(self, last: bool):
        """Skip gradient communication on the micro-batches before the last one of an accumulation."""
        return contextlib.nullcontext()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return clip_grad_norm(params, max_norm)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, generator: torch.Generator,
                  autocast: Callable[[], Any]) -> float:
        with autocast():
            return float(split_loss(loss_fn(self.eval_model(), x, y, generator))[0])

    def eval_model(self) -> nn.Module:
        return self.forward_model

    def can_eval(self, x: torch.Tensor) -> bool:
        return True

    # -- full state -------------------------------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The canonical model state dict on rank 0 (None elsewhere); collective where the model is split."""
        return D.full_model_state(self.module, self.env)

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        D.load_full_model_state(self.module, state, self.env)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return D.full_optimizer_state(self.module, optimizer, self.env)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        D.load_full_optimizer_state(self.module, optimizer, state, self.env)


class DataParallel(Strategy):
    """``ddp`` (a replica per rank, gradients all-reduced) and ``fsdp`` (FSDP2 shards, ZeRO-2/3)."""

    def __init__(self, env: D.DistEnv, cfg: DistConfig):
        super().__init__(env, cfg)
        self.holds_whole_model = env.strategy != "fsdp"
        self.shards_eval_batches = env.strategy == "ddp"  # fsdp forwards are collective: every rank, every batch

    def wrap(self, model: nn.Module, loss_fn: Callable | None = None) -> None:
        self.module = model
        self.forward_model = D.wrap_data_parallel(model, self.env, self.cfg)

    def no_sync(self, last: bool):
        return D.gradient_sync(self.module, self.forward_model, self.env, sync=last)

    def eval_model(self) -> nn.Module:
        # each DDP rank evaluates its own batches on its replica, outside the wrapper (no gradient hooks);
        # FSDP2 shards the module in place, so its forwards stay collective
        return self.module if self.env.strategy == "ddp" else self.forward_model


class TensorParallel(Strategy):
    """``tp``: Megatron-style column/row-parallel blocks over the whole world."""

    holds_whole_model = False

    def wrap(self, model: nn.Module, loss_fn: Callable | None = None) -> None:
        D.apply_tensor_parallel(model, self.env)
        self.module = model
        self.forward_model = model


class PipelineParallel(Strategy):
    """``pp``: one contiguous stage of blocks per rank, micro-batches through a GPipe/1F1B schedule."""

    holds_whole_model = False

    def __init__(self, env: D.DistEnv, cfg: DistConfig):
        super().__init__(env, cfg)
        self.pipe: D.Pipeline | None = None

    def wrap(self, model: nn.Module, loss_fn: Callable | None = None) -> None:
        from lmstack.model.decoder import lm_loss

        self.pipe = D.build_pipeline(model, self.env, self.cfg, lm_loss)
        self.module = self.pipe.stage_module
        self.forward_model = self.module

    def compile(self) -> None:  # the schedule calls the stage module itself
        pass

    def _run(self, run: Callable, x: torch.Tensor, y: torch.Tensor, autocast: Callable[[], Any]) -> float:
        """Drive this rank's part of a schedule; the last stage's mean micro-batch loss, broadcast."""
        env = self.env
        losses: list[torch.Tensor] = []
        with autocast():
            if env.rank == 0:
                run(x)
            elif env.rank == env.world_size - 1:
                run(target=y, losses=losses)
            else:
                run()
        mean = torch.stack(losses).mean().item() if losses else 0.0
        return D.broadcast_scalar(mean, env.world_size - 1, env)

    def forward_backward(self, next_batch, loss_fn, grad_accum, generator_for, autocast, scale, device):
        if grad_accum != 1:
            raise ConfigError("grad_accum: pipeline parallelism accumulates through dist.pp_microbatches; "
                              "set grad_accum = 1")
        x, y = next_batch()  # every stage reads the same batch: the first uses x, the last y
        x, y = x.to(device), y.to(device)
        loss = self._run(self.pipe.schedule.step, x, y, autocast)
        D.sync_tied_grads(self.pipe, self.env)
        return torch.tensor(loss), x.numel()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        if not self.env.distributed:
            return clip_grad_norm(params, max_norm)
        return clip_grad_norm(params, max_norm, D.pipeline_norm_params(self.pipe), D.sum_over_world)

    def can_eval(self, x: torch.Tensor) -> bool:
        return x.shape[0] % self.cfg.pp_microbatches == 0

    def eval_loss(self, x, y, loss_fn, generator, autocast) -> float:
        return self._run(self.pipe.schedule.eval, x, y, autocast)


def make_strategy(env: D.DistEnv, cfg: DistConfig) -> Strategy:
    """The strategy object for this process's ``env.strategy``."""
    if env.strategy in ("ddp", "fsdp"):
        return DataParallel(env, cfg)
    if env.strategy == "tp":
        return TensorParallel(env, cfg)
    if env.strategy == "pp":
        return PipelineParallel(env, cfg)
    return Strategy(env, cfg)
