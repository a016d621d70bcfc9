"""Structured pruning: remove whole attention heads, FFN neurons and blocks, giving a smaller DENSE model.

Unlike zeroed weights (:mod:`lmstack.compress.prune`), the result has fewer heads, neurons and layers and a
matching :class:`~lmstack.model.ModelConfig` (``n_head``, ``n_kv_head``, ``d_ff``, ``n_layer``; ``head_dim``
stays, so ``n_head * head_dim`` may differ from ``d_model``), so every matrix product is smaller: a real
speed-up that saves, loads (:func:`lmstack.model.save` / :func:`~lmstack.model.load`) and exports
(:func:`lmstack.model.hf.save`, where the family can express ``head_dim``: Llama, Qwen2) like any model.
A config holds one ``n_head`` and one ``d_ff`` for all layers, so every kept layer loses the same number of
heads and neurons; which ones is decided per layer by the scores.

What a unit is, in the weight layout of :class:`lmstack.model.layers.Attention` and the FFNs:

- query head h: rows ``h*D:(h+1)*D`` of the fused ``qkv`` (the q part) and the same columns of ``o``;
  it reads KV head ``h // (H/G)`` (H query heads, G KV heads, D head_dim);
- KV group g: KV head g (its rows in the k and v parts of ``qkv``) with its H/G query heads;
- FFN neuron j: MLP: row j of ``up`` and column j of ``down``; SwiGLU: rows j and d_ff + j of the fused
  ``gate_up`` (gate and up halves) and column j of ``down``;
- block: the whole residual block (its layer index disappears; the later blocks move up).

GQA (``gqa``): ``"group"`` (default) removes whole KV groups, a KV head with all its query heads, so the
KV cache shrinks as well (the count must be a multiple of H/G); ``"query"`` removes the same number of
query heads from every group and keeps every KV head (for MHA, H = G, the two are the same). A fraction
counts units (groups, or heads per group) rounded half up: 25% of 4 KV groups is 1 group. Either way at least one KV group, and at least one
query head per group, is kept, and ``n_head`` stays a multiple of ``n_kv_head``.

Scores (larger = keep), ``score=``:

- ``magnitude``: weight norms. A head: ``||W_q,h||_F * ||W_o[:, h]||_F``; a neuron:
  ``||W_up,j|| * ||W_down[:, j]||`` (SwiGLU: times ``||W_gate,j||``); a block: ``||W_o||_F^2 + ||W_down||_F^2``
  (how much it can write into the residual stream);
- ``activation`` (needs calibration batches): mean ``|y|`` of a head's output slice (the input of ``o``), of
  a neuron's activation (the input of ``down``), both over the calibration tokens (and the head's D
  dims): a unit whose output is near zero contributes little whatever its weights; a block's
  Block Influence ``1 - E[cos(x_in, x_out)]`` (Men et al. 2024, "ShortGPT"): a block that barely turns
  the residual stream goes first. A KV group's score is the sum of its query heads' scores.

Gradient-based scores are not built. Recovery fine-tuning after pruning goes through the one trainer
(``lmstack finetune`` on the pruned folder, full or LoRA); see docs/compress.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmstack.compress.calib import accumulate, flat_input
from lmstack.compress.prune import check_fraction, n_of
from lmstack.errors import ConfigError


@dataclass
class StructuredPlan:
    """Which units survive, in the original model's numbering (every list sorted).

    ``layers``: kept block indices; ``heads`` / ``kv_heads`` / ``neurons``: per kept block, its kept query
    heads, KV heads and FFN neurons (absent = all kept)."""

    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- checks


def _check_model(model: nn.Module, heads: bool, neurons: bool) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise ConfigError("prune: structured pruning needs an lmstack decoder or encoder model")
    if cfg.arch == "encoder-decoder":
        raise ConfigError("prune: model config field 'arch'='encoder-decoder' is not supported by structured "
                          "pruning (decoder and encoder models are)")
    if heads and cfg.pos == "alibi":
        raise ConfigError("prune: model config field 'pos'='alibi': ALiBi slopes depend on n_head, so heads "
                          "cannot be removed without changing the others; prune neurons or layers instead")
    if neurons and cfg.n_experts:
        raise ConfigError("prune: model config field 'n_experts' is set: FFN neuron pruning of MoE experts "
                          "is not supported; prune heads or layers instead")
    for block in model.blocks:
        names = ["attn.qkv", "attn.o"] + ([] if cfg.n_experts else ["ffn.down"])
        for name in names:
            if type(block.get_submodule(name)) is not nn.Linear:
                raise ConfigError(f"prune: {name} is a {type(block.get_submodule(name)).__name__}, not a float "
                                  f"nn.Linear; prune before quantizing (or merge adapters first)")


def _count(field_name: str, value: float | int, total: int) -> int:
    """Units to remove: an int >= 1 is a count, a float a fraction in [0, 1) of ``total`` (rounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"prune: {field_name} must be a fraction in [0, 1) or a count (got {value!r})")
    if isinstance(value, int) and value >= 1:
        if value > total:
            raise ConfigError(f"prune: {field_name}={value} is more than the model has ({total})")
        return value
    return n_of(check_fraction(field_name, value), total)


def heads_to_remove(cfg, heads: float | int, gqa: str) -> tuple[int, int]:
    """(KV groups to remove, query heads to remove per kept group) for ``heads`` under the GQA mode."""
    if gqa not in ("group", "query"):
        raise ConfigError(f"prune: gqa must be group or query (got {gqa!r})")
    n_h, n_g = cfg.n_head, cfg.n_kv_head
    per = n_h // n_g
    c = _count("heads", heads, n_h)
    if n_g == n_h:                      # MHA: every head is its own KV group; the two modes are one
        gqa = "group"
    if isinstance(heads, float):        # a fraction: of the groups, or of each group's query heads
        units = n_of(heads, n_g if gqa == "group" else per)
    else:
        unit = per if gqa == "group" else n_g
        if c % unit:
            raise ConfigError(f"prune: heads={c} must be a multiple of {unit} with gqa={gqa!r} "
                              f"(n_head={n_h}, n_kv_head={n_g})")
        units = c // unit
    if gqa == "group":
        if units >= n_g:
            raise ConfigError(f"prune: heads={heads!r} would remove all {n_g} KV groups; at least one KV group "
                              f"(n_kv_head >= 1) must stay")
        return units, 0
    if units >= per:
        raise ConfigError(f"prune: heads={heads!r} would remove all {per} query heads of each KV group; "
                          f"at least one per group must stay (or use gqa='group')")
    return 0, units


# ---------------------------------------------------------------------------------------------------- scores


def _block_names(model: nn.Module) -> list[str]:
    prefix = next(n for n, m in model.named_modules() if m is model.blocks)
    return [f"{prefix}.{i}" for i in range(len(model.blocks))]


@torch.no_grad()
def unit_scores(model: nn.Module, score: Literal["magnitude", "activation"] = "magnitude",
                batches: Iterable[torch.Tensor] | None = None) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """``{"heads": [(n_head,) per block], "neurons": [(d_ff,) per block] (dense FFNs only), "layers": (n_layer,)}``,
    the importance of each unit; see the module docstring for the formulas."""
    cfg = model.config
    n_h, d = cfg.n_head, cfg.head_dim
    blocks = list(model.blocks)
    dense_ffn = not cfg.n_experts
    if score == "magnitude":
        heads, neurons, layers = [], [], []
        for b in blocks:
            wq = b.attn.qkv.weight[:cfg.q_dim].float().view(n_h, -1)             # (H, D*C)
            wo = b.attn.o.weight.float().view(cfg.d_model, n_h, d)               # (C, H, D)
            heads.append(wq.norm(dim=1) * wo.pow(2).sum(dim=(0, 2)).sqrt())
            if dense_ffn:
                down = b.ffn.down.weight.float().norm(dim=0)                     # (F,)
                if cfg.ffn == "swiglu":
                    gate, up = b.ffn.gate_up.weight.float().chunk(2, dim=0)
                    neurons.append(gate.norm(dim=1) * up.norm(dim=1) * down)
                else:
                    neurons.append(b.ffn.up.weight.float().norm(dim=1) * down)
            outs = [p for n, p in b.named_parameters() if n in ("attn.o.weight",) or n.endswith("down.weight")]
            layers.append(sum(float(p.float().pow(2).sum()) for p in outs))
        out = {"heads": heads, "layers": torch.tensor(layers)}
        if dense_ffn:
            out["neurons"] = neurons
        return out
    if score != "activation":
        raise ConfigError(f"prune: score must be magnitude or activation (got {score!r})")
    if batches is None:
        raise ConfigError("prune: score 'activation' needs calibration data (--calib FILES)")
    names = _block_names(model)

    def abs_in(inputs, output):
        x = flat_input(inputs).float()
        return x.abs().sum(dim=0), x.shape[0]

    def influence(inputs, output):
        x_in, x_out = inputs[0].double().flatten(0, -2), output.double().flatten(0, -2)
        return (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum(), x_in.shape[0]

    stats = {}
    for name in names:
        stats[f"{name}.attn.o"] = abs_in
        stats[name] = influence
        if dense_ffn:
            stats[f"{name}.ffn.down"] = abs_in
    sums, counts = accumulate(model, stats, batches, who="prune")
    out = {"heads": [(sums[f"{n}.attn.o"] / counts[f"{n}.attn.o"]).view(n_h, d).mean(dim=1) for n in names],
           "layers": torch.stack([sums[n] / counts[n] for n in names])}
    if dense_ffn:
        out["neurons"] = [sums[f"{n}.ffn.down"] / counts[f"{n}.ffn.down"] for n in names]
    return out


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` largest scores, sorted (ties: the earlier index stays)."""
    order = torch.sort(-scores.double(), stable=True).indices[:keep]
    return sorted(order.tolist())


def plan_structured(model: nn.Module, heads: float | int = 0.0, neurons: float | int = 0.0, layers: int = 0,
                    score: Literal["magnitude", "activation"] = "magnitude",
                    batches: Iterable[torch.Tensor] | None = None, gqa: Literal["group", "query"] = "group"
                    ) -> StructuredPlan:
    """Decide what to keep: drop the ``layers`` least important blocks, then in each kept block the
    least important heads (``heads``: a fraction in [0, 1) or a count of query heads) and neurons
    (``neurons``: a fraction or a count per layer); all scores come from one look at the original model."""
    cfg = model.config
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ConfigError(f"prune: layers must be a whole number of blocks to drop, >= 0 (got {layers!r})")
    if layers >= cfg.n_layer:
        raise ConfigError(f"prune: layers={layers} drops more layers than the model has (n_layer={cfg.n_layer}); "
                          f"at least one must stay")
    groups_out, per_out = heads_to_remove(cfg, heads, gqa)
    n_neurons = _count("neurons", neurons, cfg.d_ff)
    if n_neurons >= cfg.d_ff:
        raise ConfigError(f"prune: neurons={neurons!r} would remove all d_ff={cfg.d_ff} FFN neurons")
    _check_model(model, bool(groups_out or per_out), bool(n_neurons))
    if not (layers or groups_out or per_out or n_neurons):
        return StructuredPlan(layers=list(range(cfg.n_layer)))
    s = unit_scores(model, score, batches)
    plan = StructuredPlan(layers=_top(s["layers"], cfg.n_layer - layers))
    per = cfg.n_head // cfg.n_kv_head
    for i in plan.layers:
        hs = s["heads"][i].view(cfg.n_kv_head, per)                              # (G, H/G)
        if groups_out:
            kept_g = _top(hs.sum(dim=1), cfg.n_kv_head - groups_out)
            plan.kv_heads[i] = kept_g
            plan.heads[i] = [g * per + j for g in kept_g for j in range(per)]
        elif per_out:
            plan.kv_heads[i] = list(range(cfg.n_kv_head))
            plan.heads[i] = [g * per + j for g in range(cfg.n_kv_head) for j in _top(hs[g], per - per_out)]
        if n_neurons:
            plan.neurons[i] = _top(s["neurons"][i], cfg.d_ff - n_neurons)
    return plan


# ---------------------------------------------------------------------------------------------------- apply


def _uniform(field_name: str, sizes: set[int]) -> int:
    if len(sizes) != 1:
        raise ConfigError(f"prune plan: every kept layer must keep the same number of {field_name} "
                          f"(got {sorted(sizes)}); a ModelConfig has one value for all layers")
    return sizes.pop()


def pruned_config(cfg, plan: StructuredPlan):
    """The ModelConfig of the model :func:`apply_plan` builds (head_dim pinned, so it survives)."""
    if not plan.layers:
        raise ConfigError("prune plan: no layer kept")
    n_head = _uniform("heads", {len(plan.heads.get(i, range(cfg.n_head))) for i in plan.layers})
    n_kv = _uniform("kv heads", {len(plan.kv_heads.get(i, range(cfg.n_kv_head))) for i in plan.layers})
    d_ff = _uniform("neurons", {len(plan.neurons.get(i, range(cfg.d_ff))) for i in plan.layers})
    per_old = cfg.n_head // cfg.n_kv_head
    for i in plan.layers:
        kv = plan.kv_heads.get(i, list(range(cfg.n_kv_head)))
        for h in plan.heads.get(i, range(cfg.n_head)):
            if h // per_old not in kv:
                raise ConfigError(f"prune plan: layer {i} keeps query head {h} but not its KV head {h // per_old}")
    return cfg.replace(n_layer=len(plan.layers), n_head=n_head, n_kv_head=n_kv, head_dim=cfg.head_dim, d_ff=d_ff)


def _rows(units: list[int], size: int, offset: int = 0) -> list[int]:
    return [offset + u * size + k for u in units for k in range(size)]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """A new, smaller dense model holding the kept units' weights (the input model is left unchanged)."""
    from lmstack.model import build_model
    from lmstack.model.layers import retie_weights

    cfg = model.config
    new_cfg = pruned_config(cfg, plan)
    _check_model(model, new_cfg.n_head != cfg.n_head, new_cfg.d_ff != cfg.d_ff)
    d = cfg.head_dim
    prefix = _block_names(model)[0].rsplit(".", 1)[0] + "."
    renumber = {old: new for new, old in enumerate(plan.layers)}
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value.clone()              # own storage: training the pruned model leaves the input alone
            continue
        idx, rest = key[len(prefix):].split(".", 1)
        i = int(idx)
        if i not in renumber:
            continue
        heads = plan.heads.get(i, list(range(cfg.n_head)))
        kv = plan.kv_heads.get(i, list(range(cfg.n_kv_head)))
        neurons = plan.neurons.get(i, list(range(cfg.d_ff)))
        rows = cols = None
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            rows = _rows(heads, d) + _rows(kv, d, cfg.q_dim) + _rows(kv, d, cfg.q_dim + cfg.kv_dim)
        elif rest == "attn.o.weight":
            cols = _rows(heads, d)
        elif rest in ("ffn.up.weight", "ffn.up.bias"):
            rows = neurons
        elif rest in ("ffn.gate_up.weight", "ffn.gate_up.bias"):
            rows = neurons + [cfg.d_ff + j for j in neurons]
        elif rest == "ffn.down.weight":
            cols = neurons
        if rows is not None:
            value = value.index_select(0, torch.tensor(rows, device=value.device))
        if cols is not None:
            value = value.index_select(1, torch.tensor(cols, device=value.device))
        state[f"{prefix}{renumber[i]}.{rest}"] = value.clone()
    with torch.device("meta"):
        new = build_model(new_cfg)
    new.load_state_dict(state, strict=True, assign=True)
    retie_weights(new)
    return new.train(model.training)


def prune_structured(model: nn.Module, heads: float | int = 0.0, neurons: float | int = 0.0, layers: int = 0,
                     score: Literal["magnitude", "activation"] = "magnitude",
                     batches: Iterable[torch.Tensor] | None = None, gqa: Literal["group", "query"] = "group"
                     ) -> tuple[nn.Module, StructuredPlan]:
    """:func:`plan_structured` then :func:`apply_plan`: the smaller model and the plan it follows."""
    plan = plan_structured(model, heads, neurons, layers, score, batches, gqa)
    return apply_plan(model, plan), plan


@torch.no_grad()
def zero_pruned(model: nn.Module, plan: StructuredPlan) -> None:
    """Zero, in place, the contribution of every unit the plan removes (heads: their ``o`` columns; neurons:
    their ``down`` columns), keeping shapes: the masked twin :func:`apply_plan`'s model must equal.
    Dropped blocks are not touched (for pre-norm blocks also zero their ``o``/``down`` weights and biases)."""
    cfg = model.config
    for i in plan.layers:
        b = model.blocks[i]
        if i in plan.heads:
            gone = [h for h in range(cfg.n_head) if h not in plan.heads[i]]
            b.attn.o.weight[:, _rows(gone, cfg.head_dim)] = 0
        if i in plan.neurons:
            gone = [j for j in range(cfg.d_ff) if j not in plan.neurons[i]]
            b.ffn.down.weight[:, gone] = 0
