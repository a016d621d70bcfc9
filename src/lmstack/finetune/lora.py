"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") by module swap.

A frozen linear ``W`` (out, in) gets a trainable low-rank update: ``y = W x + (alpha / r) * B A dropout(x)``
with ``A`` (r, in) and ``B`` (out, r). ``A`` starts Kaiming-uniform and ``B`` at zero, so the adapted
model starts out equal to the base (the initialisation of the paper and of peft).

Targets are named by *logical* linear names, independent of how our model fuses projections::

    attn.q  attn.k  attn.v  attn.o        (q/k/v are slices of the fused ``attn.qkv``)
    ffn.gate  ffn.up  ffn.down            (gate/up are slices of SwiGLU's fused ``ffn.gate_up``)
    cross.q  cross.k  cross.v  cross.o    (encoder-decoder cross-attention; k/v slices of ``cross.kv``)
    lm_head

A pattern matches a full logical name (``blocks.3.attn.q``) when it equals it, is a dotted suffix of it
(``q``, ``attn.q``) or is a regular expression that matches it entirely (``blocks\\.[0-3]\\.attn\\.[qv]``).
The shortcuts ``attention``, ``mlp`` and ``all-linear`` expand to the usual lists. Naming a fused linear
itself (``qkv``, ``gate_up``) gives one LoRA over the whole fused output, like peft on GPT-2's ``c_attn``;
naming its slices gives each slice its own ``A`` and ``B``, like peft on Llama's ``q_proj``/``k_proj``/
``v_proj``: the two are different adapters, and both are exactly what peft computes for those models.

Several adapters can live on one base (``add_lora(..., name="math")``); :func:`set_adapter` picks the
active ones. :func:`merge_lora` folds the active adapters into the base weights (no extra latency at
inference) and :func:`unmerge_lora` takes them out again.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError, LmstackError
from lmstack.model.swap import set_module

SHORTCUTS = {
    "attention": ["attn.q", "attn.k", "attn.v", "attn.o"],
    "mlp": ["ffn.gate", "ffn.up", "ffn.down"],
    "all-linear": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down",
                   "cross.q", "cross.k", "cross.v", "cross.o"],
}


@dataclass
class LoraConfig:
    """Rank, scale, dropout and targets of one LoRA adapter (see the module docstring for ``targets``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    rslora: bool = False        # scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets: name at least one module pattern (e.g. attention, mlp, q, v)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# ----------------------------------------------------------------------------------------------------
# which linears, and which slices of them


def logical_parts(name: str, linear: nn.Module, model: nn.Module) -> list[tuple[str, int]]:
    """The logical slices (name, width) of a fused linear's output, in order; one part for a plain linear."""
    cfg = getattr(model, "config", None)
    out = linear.out_features
    parent, _, leaf = name.rpartition(".")
    if leaf == "qkv" and cfg is not None:
        return [(f"{parent}.q", cfg.q_dim), (f"{parent}.k", cfg.kv_dim), (f"{parent}.v", cfg.kv_dim)]
    if leaf == "kv" and cfg is not None:
        return [(f"{parent}.k", cfg.kv_dim), (f"{parent}.v", cfg.kv_dim)]
    if leaf == "gate_up":
        return [(f"{parent}.gate", out // 2), (f"{parent}.up", out // 2)]
    return [(name, out)]


def _expand(patterns: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        out.extend(SHORTCUTS.get(p, [p]))
    return out


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def is_linear(module: nn.Module) -> bool:
    """A plain or quantized frozen linear that LoRA may wrap."""
    from lmstack.compress.quantize import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


def find_targets(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[tuple[int, int, str]]]:
    """{linear module name: [(offset, width, part name)]} for every linear (slice) a pattern selects.

    A pattern that selects nothing is an error naming it and listing the names that exist.
    """
    patterns = list(patterns)
    expanded = {p: _expand([p]) for p in patterns}
    used = {p: False for p in patterns}
    out: dict[str, list[tuple[int, int, str]]] = {}
    all_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module = module.base
        elif not is_linear(module) or ".lora_" in name or name.endswith(".base"):
            continue
        parts = logical_parts(name, module, model)
        all_names.extend(p for p, _ in parts)
        if len(parts) > 1:
            all_names.append(name)
        whole = [p for p in patterns if any(_matches(e, name) for e in expanded[p])]
        chosen: list[tuple[int, int, str]] = []
        if whole and len(parts) > 1:       # the fused linear named as such: one LoRA over all of it
            chosen = [(0, module.out_features, name)]
            for p in whole:
                used[p] = True
        else:
            offset = 0
            for part, width in parts:
                hit = [p for p in patterns if any(_matches(e, part) for e in expanded[p])]
                for p in hit:
                    used[p] = True
                if hit:
                    chosen.append((offset, width, part))
                offset += width
        if chosen:
            out[name] = chosen
    unused = [p for p, u in used.items() if not u]
    if unused:
        leaves = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in all_names})
        raise ConfigError(f"lora target pattern(s) {', '.join(map(repr, unused))} match no linear layer of this "
                          f"model; names look like: {', '.join(leaves[:20])}")
    return out


# ----------------------------------------------------------------------------------------------------
# the wrapper


class LoRALinear(nn.Module):
    """A frozen linear (``base``, plain or quantized) plus any number of named LoRA adapters.

    ``lora_A[name][part]`` (r, in) and ``lora_B[name][part]`` (width, r); a part is a slice of the output
    (``offsets[name][part]``). ``active`` lists the adapters added in forward; ``merged`` those folded
    into ``base.weight`` (never added twice).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self.scales: dict[str, float] = {}
        self.dropouts = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    @property
    def weight(self) -> torch.Tensor:      # code that reads ``.weight`` (e.g. HF export) sees the base's
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, parts: list[tuple[int, int, str]], cfg: LoraConfig) -> None:
        if name in self.lora_A:
            raise LmstackError(f"a LoRA adapter named {name!r} is already on this model")
        w = self.base.weight
        dev = w.device
        dtype = w.dtype if w.is_floating_point() else torch.float32
        a, b = nn.ParameterDict(), nn.ParameterDict()
        self.offsets[name] = {}
        for offset, width, part in parts:
            key = part.rsplit(".", 1)[-1]
            a[key] = nn.Parameter(torch.empty(cfg.r, self.in_features, device=dev, dtype=dtype))
            b[key] = nn.Parameter(torch.zeros(width, cfg.r, device=dev, dtype=dtype))
            nn.init.kaiming_uniform_(a[key], a=math.sqrt(5))     # as nn.Linear's default and peft
            self.offsets[name][key] = (offset, width)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scales[name] = cfg.scale
        self.dropouts[name] = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.active.append(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B A`` laid out as the base's (out, in) weight, zero outside the adapted slices."""
        dev = next(iter(self.lora_A[name].values())).device
        w = torch.zeros(self.out_features, self.in_features, device=dev, dtype=torch.float32)
        for key, (offset, width) in self.offsets[name].items():
            w[offset:offset + width] = self.lora_B[name][key].float() @ self.lora_A[name][key].float()
        return w * self.scales[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                                    # (..., out)
        for name in self.active:
            if name in self.merged:
                continue
            h = self.dropouts[name](x)
            pieces, cursor = [], 0
            for key, (offset, width) in self.offsets[name].items():
                if offset > cursor:
                    pieces.append(y.new_zeros(*y.shape[:-1], offset - cursor))
                a, b = self.lora_A[name][key], self.lora_B[name][key]
                pieces.append(F.linear(F.linear(h.to(a.dtype), a), b) * self.scales[name])   # (..., width)
                cursor = offset + width
            if cursor < self.out_features:
                pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - cursor))
            y = y + torch.cat(pieces, dim=-1).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.active:
            if name not in self.merged:
                self._base_weight_add(self.delta_weight(name))
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in list(self.merged):
            self._base_weight_add(-self.delta_weight(name))
            self.merged.remove(name)

    def _base_weight_add(self, delta: torch.Tensor) -> None:
        if not isinstance(self.base, nn.Linear):
            raise LmstackError("cannot merge LoRA into a quantized base in place; use merge_and_unload, which "
                               "dequantizes the base first")
        w = self.base.weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


# ----------------------------------------------------------------------------------------------------
# model-level functions


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoraConfig, name: str = "default", freeze: bool = True) -> dict[str, list[str]]:
    """Wrap the targeted linears of ``model`` in place and add adapter ``name``; returns {linear: [parts]}.

    ``freeze`` sets ``requires_grad=False`` on everything except this adapter's A and B. Adapters added
    earlier stay on the model, inactive (see :func:`set_adapter`), and are frozen too.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
    targets = find_targets(model, cfg.targets)
    for lin_name, parts in targets.items():
        module = model.get_submodule(lin_name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            set_module(model, lin_name, module)
        module.add(name, parts, cfg)
    if freeze:
        for p_name, p in model.named_parameters():
            p.requires_grad = f".lora_A.{name}." in p_name or f".lora_B.{name}." in p_name
    set_adapter(model, name)
    return {k: [p for _, _, p in v] for k, v in targets.items()}


def set_adapter(model: nn.Module, names: str | list[str] | None) -> None:
    """Make ``names`` the active adapters (None: none, the base model). Merged adapters are unmerged first."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    layers = lora_layers(model)
    known = {n for m in layers.values() for n in m.lora_A}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LmstackError(f"no LoRA adapter named {', '.join(map(repr, unknown))} on this model "
                           f"(adapters: {', '.join(sorted(known)) or 'none'})")
    for m in layers.values():
        m.unmerge()
        m.active = [n for n in names if n in m.lora_A]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: no LoRA adapter is added (merged ones are taken out first),
    then the adapters that were active (and merged) before are restored.

    This is the reference model of DPO/KTO/PPO with LoRA: the frozen base is the same tensors as the policy's,
    so no second copy of the model is held (peft's ``disable_adapter()``).
    """
    layers = lora_layers(model)
    saved = {name: (list(m.active), list(m.merged)) for name, m in layers.items()}
    for m in layers.values():
        m.unmerge()
        m.active = []
    try:
        yield model
    finally:
        for name, m in layers.items():
            m.active = saved[name][0]
            if saved[name][1]:
                m.merge()


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters into the base weights; the forward then skips them (same outputs)."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take merged adapters back out of the base weights."""
    for m in lora_layers(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain ``nn.Linear`` holding base + active adapters (quantized bases are
    dequantized first). The result is an ordinary model: ``lmstack.model.save`` / ``hf.save`` export it."""
    from lmstack.compress.quantize import QuantLinear

    for name, m in lora_layers(model).items():
        base = m.base
        if isinstance(base, QuantLinear):
            base = base.dequantized_linear()
        with torch.no_grad():
            w = base.weight.float()
            for a in m.active:
                if a not in m.merged:
                    w = w + m.delta_weight(a).to(w.device)
            base.weight.copy_(w.to(base.weight.dtype))
        base.weight.requires_grad_(False)
        set_module(model, name, base)
    return model


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The A and B tensors of adapter ``name``, keyed ``<linear>.lora_A.<part>`` (adapter name dropped)."""
    out = {}
    for lin_name, m in lora_layers(model).items():
        if name in m.lora_A:
            for key in m.offsets[name]:
                out[f"{lin_name}.lora_A.{key}"] = m.lora_A[name][key].detach()
                out[f"{lin_name}.lora_B.{key}"] = m.lora_B[name][key].detach()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy tensors written by :func:`adapter_state_dict` into adapter ``name``; shapes must agree."""
    own = {}
    for lin_name, m in lora_layers(model).items():
        if name in m.lora_A:
            for key in m.offsets[name]:
                own[f"{lin_name}.lora_A.{key}"] = m.lora_A[name][key]
                own[f"{lin_name}.lora_B.{key}"] = m.lora_B[name][key]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise LmstackError(f"LoRA adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(p.shape) != tuple(state[k].shape):
                raise LmstackError(f"LoRA tensor {k}: shape {tuple(state[k].shape)} in the adapter, "
                                   f"{tuple(p.shape)} on this model (an adapter for a different base?)")
            p.copy_(state[k])
