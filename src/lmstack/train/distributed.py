"""torch.distributed scale-out: one code path from one laptop process to ``torchrun --nproc-per-node N``.

The world comes from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); without it the run is a single process and nothing is initialised.
``dist.strategy`` chooses how the world splits the work:

- ``ddp``: data parallel, a full replica per rank, gradients all-reduced (``DistributedDataParallel``).
- ``fsdp``: FSDP2 (``fully_shard`` per block, then the root): parameters, gradients and optimizer state
  sharded (ZeRO-3); ``reshard_after_forward=False`` keeps the gathered parameters from forward to
  backward (ZeRO-2: less communication, more memory).
- ``tp``: Megatron-style tensor parallelism with DTensor (``parallelize_module``): the fused QKV and the
  FFN's up/gate projections are column-parallel, the attention output and FFN down projections are
  row-parallel, so each block does one all-reduce in attention and one in the FFN. Each rank holds
  ``n_head / tp`` heads. Embeddings, norms and the LM head stay replicated.
- ``pp``: pipeline parallelism (``torch.distributed.pipelining``): the blocks are split into one
  contiguous stage per rank, the first stage also holds the embeddings, the last the final norm and
  head; micro-batches flow through a GPipe or 1F1B schedule. Tied embeddings are kept in sync by
  all-reducing their gradient between the first and last stage (as Megatron does).

TP and PP use the whole world (no data parallelism alongside them); DDP and FSDP shard the data.

Fused projections under TP: a column-parallel shard of ``qkv`` must hold *its own heads'* q, k and v,
not a contiguous third of the rows. So the rows of fused weights are permuted before sharding (rank r's
chunk = [q_r | k_r | v_r], likewise [gate_r | up_r]) and permuted back whenever a full state dict is
taken; checkpoints always hold the canonical (single-process) layout.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.config import DistConfig


@dataclass
class DistEnv:
    """Where this process sits: its rank in the world and in the data-parallel group, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    initialized: bool = False          # did we call init_process_group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size if self.strategy in ("ddp", "fsdp") else 1

    @property
    def dp_rank(self) -> int:
        return self.rank if self.strategy in ("ddp", "fsdp") else 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistConfig, device: torch.device) -> DistEnv:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    strategy = cfg.strategy
    if world == 1:
        return DistEnv(device=device, strategy="none" if strategy in ("ddp", "fsdp") else strategy)
    if strategy == "none":
        raise ConfigError(f"dist.strategy: launched on {world} processes; choose ddp, fsdp, tp or pp")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    initialized = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
        initialized = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, strategy=strategy,
                   initialized=initialized)


def shutdown(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv, over: str = "dp") -> torch.Tensor:
    """Mean of ``value`` over the data-parallel group (``over="dp"``) or the whole world."""
    size = env.dp_size if over == "dp" else env.world_size
    if size == 1:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / size


def broadcast_scalar(value: float, src: int, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src)
    return float(t.item())


# ---------------------------------------------------------------------------------------------------------
# activation checkpointing


def _checkpointed(forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block's activations in the backward pass instead of storing them.

    The block's ``forward`` is wrapped on the instance, so parameter names (and checkpoints) don't
    change. Returns the number of blocks wrapped.
    """
    from lmstack.model.layers import Block

    n = 0
    for module in model.modules():
        if isinstance(module, Block) and not isinstance(module.forward, functools.partial):
            module.forward = functools.partial(_checkpointed, module.forward)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# DDP and FSDP2


def wrap_data_parallel(model: nn.Module, env: DistEnv, cfg: DistConfig) -> nn.Module:
    """DDP or FSDP2 around ``model`` (returns what to call forward on; FSDP2 shards ``model`` in place)."""
    if env.strategy == "ddp" and env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if env.strategy == "fsdp" and env.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lmstack.model.layers import Block

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
        # the root is resharded after forward by FSDP2's own rule (never, as backward needs it at once)
        fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, forward_model: nn.Module, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-batches before the last of an accumulation."""
    if not env.distributed or sync:
        if env.strategy == "fsdp" and env.distributed:
            model.set_requires_gradient_sync(True)
        yield
        return
    if env.strategy == "ddp":
        with forward_model.no_sync():
            yield
    elif env.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


# ---------------------------------------------------------------------------------------------------------
# tensor parallel


def _fused_perm(sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that puts rank r's slice of every segment of a fused weight into rank r's contiguous chunk."""
    rows, offset, per_rank = [], 0, []
    for s in sizes:
        if s % tp:
            raise ConfigError(f"tensor parallel: a fused projection segment of {s} rows is not divisible by tp={tp}")
        per_rank.append((offset, s // tp))
        offset += s
    for r in range(tp):
        for start, n in per_rank:
            rows.append(torch.arange(start + r * n, start + (r + 1) * n))
    return torch.cat(rows)


def _tp_rules(cfg: Any, tp: int) -> list[tuple[re.Pattern, torch.Tensor]]:
    qkv = _fused_perm([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], tp)
    gate_up = _fused_perm([cfg.d_ff, cfg.d_ff], tp)
    return [(re.compile(r"(^|\.)attn\.qkv\.(weight|bias)$"), qkv),
            (re.compile(r"(^|\.)ffn\.gate_up\.(weight|bias)$"), gate_up)]


def tp_permute(state: dict[str, Any], cfg: Any, tp: int, inverse: bool = False) -> dict[str, Any]:
    """Permute the rows of fused weights (and of tensors of the same shape in optimizer states) between
    the canonical layout and the tensor-parallel one. ``state`` maps FQNs to tensors or to dicts of tensors."""
    rules = _tp_rules(cfg, tp)

    def fix(t: Any, perm: torch.Tensor) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == perm.numel():
            p = torch.argsort(perm) if inverse else perm
            return t[p.to(t.device)]
        return t

    out = {}
    for key, value in state.items():
        perm = next((p for pat, p in rules if pat.search(key)), None)
        if perm is None:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = {k: fix(v, perm) for k, v in value.items()}
        else:
            out[key] = fix(value, perm)
    return out


def apply_tensor_parallel(model: nn.Module, env: DistEnv) -> None:
    """Shard every block's attention and FFN across the world (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lmstack.model.layers import Attention, Block

    cfg = model.config
    tp = env.world_size
    if cfg.n_experts:
        raise ConfigError("dist.strategy 'tp': mixture-of-experts models are not supported; use ddp or fsdp")
    for name in ("n_head", "n_kv_head", "d_ff"):
        if getattr(cfg, name) % tp:
            raise ConfigError(f"dist.strategy 'tp': model.{name}={getattr(cfg, name)} must be divisible by "
                              f"the world size {tp}")
    with torch.no_grad():  # canonical -> TP row layout of the fused projections
        permuted = tp_permute(dict(model.named_parameters()), cfg, tp)
        for name, p in model.named_parameters():
            if permuted[name] is not p:
                p.copy_(permuted[name])
    mesh = init_device_mesh(env.device.type, (tp,))
    local = cfg.replace(n_head=cfg.n_head // tp, n_kv_head=cfg.n_kv_head // tp, head_dim=cfg.head_dim,
                        d_ff=cfg.d_ff // tp)
    for block in (m for m in model.modules() if isinstance(m, Block)):
        plan = {"attn.qkv": ColwiseParallel(), "attn.o": RowwiseParallel()}
        if hasattr(block.ffn, "gate_up"):
            plan["ffn.gate_up"] = ColwiseParallel()
        else:
            plan["ffn.up"] = ColwiseParallel()
        plan["ffn.down"] = RowwiseParallel()
        parallelize_module(block, mesh, plan)
        for m in block.modules():
            if isinstance(m, Attention):
                m.cfg, m.n_head, m.n_kv_head = local, local.n_head, local.n_kv_head


# ---------------------------------------------------------------------------------------------------------
# pipeline parallel


class DecoderStage(nn.Module):
    """One pipeline stage of a :class:`lmstack.model.decoder.Decoder`: a contiguous range of its blocks.

    Parameter names stay those of the full model (``blocks.5.attn...``), so stage state dicts merge
    into a full one. Stage 0 maps input ids to hidden states; the last stage returns logits.
    """

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None
        self.lm_head_bias = model.lm_head_bias if last else None
        self._attn_inputs = model.attn_inputs   # a method that only reads the config

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        inp, position_ids = self._attn_inputs(t, None, None, None, h.device)
        if self.first:
            h = self.embed(h, position_ids)                                     # (B, T) ids -> (B, T, C)
        for block in self.blocks.values():
            h = block(h, inp)
        if not self.last:
            return h
        if self.norm_f is not None:
            h = self.norm_f(h)
        logits = self.lm_head(h)                                                # (B, T, vocab)
        return logits + self.lm_head_bias if self.lm_head_bias is not None else logits


def stage_bounds(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(n_layer, n_stages)
    out, lo = [], 0
    for s in range(n_stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class Pipeline:
    stage_module: DecoderStage
    schedule: Any
    tied_group: Any | None       # process group of the first and last stage, for the tied embedding


def build_pipeline(model: nn.Module, env: DistEnv, cfg: DistConfig, loss_fn) -> Pipeline:
    """Cut a decoder into ``world_size`` stages and build this rank's stage and schedule."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    mcfg = model.config
    n = env.world_size
    if mcfg.arch != "decoder":
        raise ConfigError("dist.strategy 'pp': pipeline parallelism supports decoder models (objective clm)")
    if mcfg.n_experts:
        raise ConfigError("dist.strategy 'pp': mixture-of-experts models are not supported; use ddp or fsdp")
    if mcfg.n_layer < n:
        raise ConfigError(f"dist.strategy 'pp': model.n_layer={mcfg.n_layer} is fewer than the {n} stages")
    lo, hi = stage_bounds(mcfg.n_layer, n)[env.rank]
    stage_module = DecoderStage(model, lo, hi, first=env.rank == 0, last=env.rank == n - 1).to(env.device)
    stage = PipelineStage(stage_module, env.rank, n, env.device)
    cls = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
    schedule = cls(stage, n_microbatches=cfg.pp_microbatches, loss_fn=loss_fn, scale_grads=True)
    tied_group = None
    if mcfg.tie_embeddings and n > 1:
        tied_group = dist.new_group([0, n - 1])   # every rank must take part in creating it
    return Pipeline(stage_module, schedule, tied_group)


def sync_tied_grads(pipe: Pipeline, env: DistEnv) -> None:
    """Sum the tied embedding's gradient over its two copies (first and last stage)."""
    if pipe.tied_group is None or env.rank not in (0, env.world_size - 1):
        return
    m = pipe.stage_module
    p = m.embed.tok.weight if m.first else m.lm_head.weight
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    dist.all_reduce(p.grad, group=pipe.tied_group)


def pipeline_norm_params(pipe: Pipeline) -> list[torch.Tensor]:
    """The parameters whose gradients count in the global norm: all, except the last stage's copy of a tied head."""
    m = pipe.stage_module
    skip = m.lm_head.weight if (m.last and not m.first and m.config.tie_embeddings) else None
    return [p for p in m.parameters() if p.requires_grad and p is not skip]


def sum_over_world(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone().to(torch.float64)
    dist.all_reduce(value)
    return value.float()


# ---------------------------------------------------------------------------------------------------------
# full (canonical) state dicts: what checkpoints hold whatever the strategy


def full_model_state(module: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full, canonical model state dict on rank 0 (None elsewhere). Collective under fsdp, tp and pp."""
    if env.strategy == "pp" and env.distributed:
        local = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, local)
        if not env.is_main:
            return None
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return merged
    if env.strategy in ("fsdp", "tp") and env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not env.is_main:
            return None
        if env.strategy == "tp":
            sd = tp_permute(sd, module.config, env.world_size, inverse=True)
        return sd
    if not env.is_main:
        return None
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Load a canonical full state dict (every rank passes it) into this rank's (sharded) module."""
    if env.strategy == "pp" and env.distributed:
        own = module.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(f"checkpoint: missing weights for this pipeline stage, e.g. {missing[0]}")
        module.load_state_dict({k: state[k] for k in own})
        return
    if env.strategy in ("fsdp", "tp") and env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if env.strategy == "tp":
            state = tp_permute(state, module.config, env.world_size)
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
        return
    module.load_state_dict(state)


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict | None:
    """The optimizer state keyed by parameter names, unsharded, on rank 0 (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = env.strategy in ("fsdp", "tp") and env.distributed
    osd = get_optimizer_state_dict(module, optimizer,
                                   options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    if env.strategy == "pp" and env.distributed:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, _to_cpu(osd))
        if not env.is_main:
            return None
        merged = {"state": {}, "param_groups": [dict(g, params=[]) for g in gathered[0]["param_groups"]]}
        for part in gathered:
            merged["state"].update(part["state"])
            for g_all, g in zip(merged["param_groups"], part["param_groups"]):
                g_all["params"] += [p for p in g["params"] if p not in g_all["params"]]
        return merged
    if not env.is_main:
        return None
    if env.strategy == "tp" and env.distributed:
        osd = dict(osd, state=tp_permute(osd["state"], module.config, env.world_size, inverse=True))
    return _to_cpu(osd)


def load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              env: DistEnv) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = env.strategy in ("fsdp", "tp") and env.distributed
    if env.strategy == "pp" and env.distributed:
        own = {name for name, _ in module.named_parameters()}
        state = {"state": {k: v for k, v in state["state"].items() if k in own},
                 "param_groups": [dict(g, params=[p for p in g["params"] if p in own]) for g in state["param_groups"]]}
    if env.strategy == "tp" and env.distributed:
        state = dict(state, state=tp_permute(state["state"], module.config, env.world_size))
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=full))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` on every rank (the world's list, in rank order)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
