"""AdamW with decoupled weight-decay groups, learning-rate schedules, and gradient clipping.

Weight decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) shrinks the
matrices of the linear layers and the embeddings; vectors (norm gains, biases) are not decayed, as
decaying a gain pulls it towards zero rather than regularising anything (GPT-2/nanoGPT convention).
Tied weights appear once, because ``named_parameters`` de-duplicates shared tensors.

Schedules are pure functions of the step, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmstack.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (dim >= 2) and not decayed (dim < 2), trainable parameters only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def fused_available(model: nn.Module) -> bool:
    """Fused AdamW runs where every parameter is a plain (non-DTensor) float tensor on CUDA, MPS or CPU."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return bool(params) and all(
        not isinstance(p, DTensor) and p.is_floating_point() and p.device.type in ("cuda", "mps", "cpu")
        for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    from torch.distributed.tensor import DTensor

    fused = fused_available(model) if cfg.fused is None else cfg.fused
    n_dtensor = sum(isinstance(p, DTensor) for p in model.parameters())
    # foreach kernels need all-plain or all-DTensor lists; tensor parallel mixes them (replicated norms)
    foreach = None if fused else n_dtensor in (0, sum(1 for _ in model.parameters()))
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None, foreach=foreach)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    - warmup: linear from lr/warmup to lr over ``warmup_steps``;
    - ``cosine``: half a cosine from lr down to ``lr * min_lr_ratio`` at the last step;
    - ``wsd`` (warmup-stable-decay, MiniCPM 2024): constant, then a linear decay to the minimum over
      the last ``decay_fraction`` of the steps (a run can be extended from any stable-phase checkpoint);
    - ``linear``: linear decay to the minimum; ``constant``: lr after warmup.
    """
    lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return lr + (min_lr - lr) * progress
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, norm_params: list[torch.Tensor] | None = None,
                   reduce_sq: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (0: no clipping); return the norm.

    Works when some parameters are DTensors (tensor parallel, FSDP2): each sharded gradient's norm is
    taken over its full logical tensor, so a shard counts once, not once per rank. Under pipeline
    parallelism each rank holds different parameters: ``reduce_sq`` sums the squared norm over ranks and
    ``norm_params`` leaves out the second copy of a tied weight.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads and reduce_sq is None:
        return torch.zeros(())
    if reduce_sq is None and norm_params is None and not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    counted = [p.grad for p in (params if norm_params is None else norm_params) if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in counted:
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = sq + n.cpu().pow(2)
    if reduce_sq is not None:
        sq = reduce_sq(sq)
    total = sq.sqrt()
    if max_norm > 0:
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total
