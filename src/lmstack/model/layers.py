"""Building blocks, bottom-up: norms, positions, attention, FFN, mixture of experts, the residual block.

Shapes: B batch, T query length, S key length (cached + new), H query heads, G KV heads, D head dim,
C model width. Attention masks are boolean (True = may attend) or, for ALiBi, additive floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.config import ModelConfig

if TYPE_CHECKING:
    from lmstack.model.cache import KVCache


# ----------------------------------------------------------------------------------------------------
# norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of six (the same arithmetic, bit for bit in fp32): decode speed
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def output_logits(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output projection; under autocast it runs in fp32 on the fp32 master weight.

    Why: bf16 logits cost quality, measured: the speedrun's tiny decoder (tied embeddings, vocab 4,096) after
    150 steps reached validation loss 6.054 with bf16 autocast everywhere, 5.937 in fp32, and 5.925 with bf16
    autocast except this one matmul (attention in fp32 instead did not help: 6.130). At 600 steps the gap
    had grown to 0.37 nats. Mixed-precision recipes keep the logits in fp32 for the same reason.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        weight = next(head.parameters(), None)
        if weight is None or weight.dtype == torch.float32:
            with torch.autocast(device, enabled=False):
                return head(x.float())
    return head(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_bias)


# ----------------------------------------------------------------------------------------------------
# positions: all computed from position ids at forward time (no tables to resize or to cast to bf16)


def rope_frequencies(cfg: ModelConfig, device: torch.device | None = None,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) of ``cfg``'s RoPE and the factor cos/sin are multiplied by.

    Base: theta^(-2i/D). Scalings (``rope_scaling``, factor s, original context L):

    - ``linear``: positions are divided by s instead (see :func:`rope_cos_sin`);
    - ``ntk``: a larger base, theta * s^(D / (D - 2)), stretching low frequencies by ~s, keeping high ones;
    - ``dynamic`` (dynamic NTK, as transformers): the same with s replaced by s * T / L - (s - 1) for a
      sequence of T > L positions (``seq_len``), so nothing changes up to the original context;
    - ``llama3`` (Llama 3.1): wavelengths longer than L / low_freq_factor are stretched by s, shorter than
      L / high_freq_factor kept, and in between a ramp on L / wavelength mixes the two;
    - ``yarn`` (Peng et al. 2023): dims that turn more than beta_fast times over L are kept, fewer than
      beta_slow times stretched by s, a linear ramp over the dim index in between; cos and sin are
      multiplied by ``rope_attn_factor`` (default 0.1 ln s + 1), which scales the attention logits.
    """
    d, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    orig = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.rope_scaling == "ntk":
        theta = theta * s ** (d / (d - 2))
    elif cfg.rope_scaling == "dynamic":
        theta = theta * (s * max(seq_len or orig, orig) / orig - (s - 1)) ** (d / (d - 2))
    wavelen_over_2pi = theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)   # (D/2,)
    inv_freq = 1.0 / wavelen_over_2pi
    if cfg.rope_scaling == "llama3":
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        keep = ((orig / (2 * math.pi / inv_freq) - lo) / (hi - lo)).clamp(0.0, 1.0)   # 1 = high frequency
        inv_freq = (1 - keep) * inv_freq / s + keep * inv_freq
    elif cfg.rope_scaling == "yarn":
        def dim_turning(rotations: float) -> float:        # the dim index that turns `rotations` times over L
            return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low = max(math.floor(dim_turning(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(dim_turning(cfg.rope_beta_slow)), d - 1)
        high = high + 0.001 if high == low else high
        stretch = ((torch.arange(d // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1.0 / (s * wavelen_over_2pi)) * stretch + inv_freq * (1 - stretch)
        if cfg.rope_attn_factor is not None:
            return inv_freq, cfg.rope_attn_factor
        return inv_freq, 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, 1.0


_FREQ_CACHE: dict[tuple, tuple[torch.Tensor, float]] = {}


def _cached_frequencies(cfg: ModelConfig, device: torch.device, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """:func:`rope_frequencies`, memoised per (config values, device, length): a decode step would
    otherwise rebuild the same (D/2,) table each call. Not while tracing (torch.compile folds it)."""
    if torch.compiler.is_compiling():
        return rope_frequencies(cfg, device, seq_len)
    key = (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len,
           cfg.max_seq_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_beta_fast,
           cfg.rope_beta_slow, cfg.rope_attn_factor, str(device), seq_len)
    hit = _FREQ_CACHE.get(key)
    if hit is None:
        if len(_FREQ_CACHE) > 256:          # dynamic NTK makes one entry per length: stay bounded
            _FREQ_CACHE.clear()
        with torch.inference_mode(False):   # a normal tensor, usable by training after a generate call
            hit = _FREQ_CACHE[key] = rope_frequencies(cfg, device, seq_len)
    return hit


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles (times the attention factor), each (B, 1, T, D) in fp32.

    Dynamic NTK takes the sequence length from the largest position id of this call (a host sync);
    keys already in a KV cache keep the rotation they were written with, as in transformers.
    """
    pos = position_ids.float()                                          # (B, T)
    if cfg.rope_scaling == "linear":
        pos = pos / cfg.rope_scaling_factor
    seq_len = int(position_ids.max()) + 1 if cfg.rope_scaling == "dynamic" else None
    inv_freq, scale = _cached_frequencies(cfg, position_ids.device, seq_len)
    freqs = pos[..., None] * inv_freq                                   # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                    # (B, 1, T, D)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position angle (the "rotate half" layout of GPT-NeoX/Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sinusoidal_embedding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need", (B, T, C): first half sin, second half cos."""
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim)
    angles = position_ids.float()[..., None] * inv                       # (B, T, C/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes 2^(-8h/H) (Press et al. 2022); for H not a power of two, the paper's interleaving."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_2(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_head: int, q_len: int, k_len: int, causal: bool, device: torch.device) -> torch.Tensor:
    """ALiBi additive bias (1, H, T, S): -slope * distance. Queries are the last T of the S slots."""
    q_slot = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_slot = torch.arange(k_len, device=device)[None, :]
    dist = (q_slot - k_slot).float()
    dist = dist.clamp(min=0) if causal else dist.abs()                 # masked slots get -inf anyway
    return (-alibi_slopes(n_head).to(device)[:, None, None] * dist)[None]


# ----------------------------------------------------------------------------------------------------
# masks


def build_mask(key_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool,
               device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Boolean attention mask (B or 1, 1, T, S), True = may attend; None when nothing is masked.

    ``key_mask`` (B, S) marks real tokens (1) and padding (0). Queries are the last T of the S slots
    (a KV cache holds the first S - T). A query may always see itself, so that padding queries have
    a finite softmax; their outputs are never used.

    ``window`` makes attention local, by slot distance: causal, a query sees the ``window`` newest slots
    up to itself (0 <= q - k < window, as Mistral's sliding window); bidirectional, the band
    |q - k| <= window (as transformers' bidirectional sliding window).
    """
    if key_mask is None and not causal and window is None:
        return None
    q_slot = torch.arange(k_len - q_len, k_len, device=device)[:, None]     # (T, 1)
    k_slot = torch.arange(k_len, device=device)[None, :]                     # (1, S)
    mask = (k_slot <= q_slot) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if window is not None:
        mask = mask & ((q_slot - k_slot < window) if causal else ((q_slot - k_slot).abs() <= window))
    mask = mask[None, None]                                                   # (1, 1, T, S)
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]                       # (B, 1, T, S)
    if q_len <= k_len:
        mask = mask | (k_slot == q_slot)[None, None]
    return mask


# ----------------------------------------------------------------------------------------------------
# attention


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + mask) V, written out. q (B, H, T, D); k, v (B, G, S, D) -> (B, H, T, D)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:                                                   # GQA: each KV head serves `rep` query heads
        k = k.repeat_interleave(rep, dim=1)                       # (B, H, S, D)
        v = v.repeat_interleave(rep, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)             # softmax in at least fp32
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) / math.sqrt(q.shape[-1])   # (B, H, T, S)
    if is_causal:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()      # top-left, as SDPA
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v.to(acc)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention through SDPA (flash / memory-efficient kernels) or the reference path."""
    if impl == "reference":
        return attention_reference(q, k, v, mask, is_causal, dropout_p)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def prepend_kv(prefix: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool,
               q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put P extra key/value slots (prefix tuning's virtual tokens) before k, v (B, G, S, D); every query
    may attend to them, ALiBi gives them no bias. prefix: (k, v) each (G, P, D). Returns k, v, mask."""
    pk, pv = prefix
    b, n_p = k.shape[0], pk.shape[1]
    k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)        # (B, G, P + S, D)
    v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
    s = k.shape[2] - n_p
    if mask is None and (is_causal or q_len > 1):                         # causal over the real slots
        mask = build_mask(None, q_len, s, True, k.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            front = torch.ones(*mask.shape[:-1], n_p, dtype=torch.bool, device=mask.device)
        else:
            front = torch.zeros(*mask.shape[:-1], n_p, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([front, mask], dim=-1)                            # (B|1, 1|H, T, P + S)
    return k, v, mask


WINDOW_BLOCK = 128   # smallest query block of blocked sliding-window attention (tests lower it)


def window_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, window: int,
                            block: int, dropout_p: float = 0.0, impl: str = "sdpa",
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal sliding-window attention in query blocks, so the masked-out keys are never computed.

    q (B, H, T, D) are the last T of the S slots of k, v (B, G, S, D). A block of ``block`` queries
    attends to its own slots and the ``window - 1`` before them; the visibility pattern is the same for
    every block, so one ``mask`` (1, 1|H, block, block + window - 1) (bool, or ALiBi bias with -inf)
    serves them all, cut on the left where a block starts less than ``window - 1`` slots in. Cost:
    T * (block + window - 1) scores instead of T * S; the result equals the dense windowed mask's.
    """
    t, off = q.shape[2], k.shape[2] - q.shape[2]
    outs = []
    for b0 in range(0, t, block):
        n = min(block, t - b0)
        start = off + b0 - (window - 1)                  # first key slot the block's first query may see
        cut = max(0, -start)
        kb, vb = k[:, :, start + cut:off + b0 + n], v[:, :, start + cut:off + b0 + n]
        mb = mask[..., :n, cut:n + window - 1]
        if prefix is not None:
            kb, vb, mb = prepend_kv(prefix, kb, vb, mb, False, n)
        outs.append(attention(q[:, :, b0:b0 + n], kb, vb, mb, False, dropout_p, impl))
    return torch.cat(outs, dim=2)                                           # (B, H, T, D)


@dataclass
class AttnInputs:
    """What every layer's attention needs from one forward: computed once by the model, shared by the layers."""

    mask: torch.Tensor | None = None                          # (B|1, 1|H, T, S) bool or float, or None
    is_causal: bool = False                                   # use SDPA's causal kernel (T == S, no mask)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None     # cos, sin (B, 1, T, D)
    kv_cache: "KVCache | None" = None
    memory: torch.Tensor | None = None                        # cross-attention: encoder output (B, S, C)
    memory_mask: torch.Tensor | None = None                   # (B, 1, 1, S) bool or None
    # sliding-window layers (ModelConfig.sliding_window), when the window hides something in this forward:
    windowed: bool = False                                    # False: they use ``mask``/``is_causal`` too
    window_mask: torch.Tensor | None = None                   # (B|1, 1|H, T, window_keys) bool or float, or None
    window_keys: int | None = None                            # they attend over the last this many key slots
    window_block: int | None = None                           # set: they attend in query blocks of this size
                                                              # (window_attention_blocks); window_mask is the
                                                              # block mask (1, 1|H, block, block + window - 1)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA, GQA, MQA).

    Self-attention projects Q, K and V with one fused linear ``qkv``; cross-attention projects Q from
    the decoder stream (``q``) and K, V from the encoder output (``kv``). Both end in ``o``.

    ``prefix_kv``: the hook for prefix tuning (:mod:`lmstack.finetune.prefix`): None, or a callable
    returning extra (k, v), each (G, P, D), that self-attention puts before the keys at every call
    (they are not cached and have no position).
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.cross, self.layer_idx = cfg, cross, layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, cfg.q_dim, bias=cfg.attn_qkv_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * cfg.kv_dim, bias=cfg.attn_qkv_bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.attn_qkv_bias)
        self.o = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.bias)
        self.impl = cfg.attn_impl
        self.local = not cross and cfg.uses_window(layer_idx)     # sliding-window layer (AttnInputs.window_*)
        self.prefix_kv: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)              # (B, n, T, D)

    def forward(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        b, t, _ = x.shape                                                   # x (B, T, C)
        cache = inp.kv_cache
        if self.cross:
            q = self._heads(self.q(x), self.n_head)                         # (B, H, T, D)
            if cache is not None and self.layer_idx in cache.cross:
                k, v = cache.cross[self.layer_idx]                          # encoder K, V computed at prefill
            else:
                k, v = self.kv(inp.memory).split(self.cfg.kv_dim, dim=-1)   # (B, S, G*D) each
                k, v = self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
                if cache is not None:
                    cache.cross[self.layer_idx] = (k, v)
            mask, is_causal = inp.memory_mask, False
        else:
            qkv = self.qkv(x)
            qk_dim = self.cfg.q_dim + self.cfg.kv_dim
            v = self._heads(qkv[..., qk_dim:], self.n_kv_head)              # (B, G, T, D)
            qk = self._heads(qkv[..., :qk_dim], self.n_head + self.n_kv_head)   # (B, H + G, T, D)
            if inp.rope is not None:
                qk = apply_rope(qk, *inp.rope)                              # q and k heads in one go
            q, k = qk[:, :self.n_head], qk[:, self.n_head:]                 # (B, H, T, D), (B, G, T, D)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)                   # (B, G, S, D), S = cached + T
            mask, is_causal = inp.mask, inp.is_causal
            if self.local and inp.windowed:
                if inp.window_keys is not None and inp.window_keys < k.shape[2]:
                    # keys older than the window are invisible to every new query: attend over fewer
                    k, v = k[:, :, -inp.window_keys:], v[:, :, -inp.window_keys:]
                mask, is_causal = inp.window_mask, False
                if inp.window_block is not None:
                    dropout_p = self.cfg.dropout if self.training else 0.0
                    prefix = self.prefix_kv() if self.prefix_kv is not None else None
                    y = window_attention_blocks(q, k, v, mask, self.cfg.sliding_window, inp.window_block,
                                                dropout_p, self.impl, prefix)
                    return self.o(y.transpose(1, 2).reshape(b, t, self.cfg.q_dim))
            if self.prefix_kv is not None:
                k, v, mask = prepend_kv(self.prefix_kv(), k, v, mask, is_causal, t)
                is_causal = False
        dropout_p = self.cfg.dropout if self.training else 0.0
        y = attention(q, k, v, mask, is_causal, dropout_p, self.impl)       # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.cfg.q_dim)                 # (B, T, H*D)
        return self.o(y)


# ----------------------------------------------------------------------------------------------------
# feed-forward


ACT = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class MLP(nn.Module):
    """up -> activation -> down (GPT-2, BERT, BART)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = ACT[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) (Llama); gate and up are one fused linear ``gate_up``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = ACT[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)                          # (B, T, F) each
        return self.down(self.act(gate) * up)


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return SwiGLU(cfg) if cfg.ffn == "swiglu" else MLP(cfg)


# ----------------------------------------------------------------------------------------------------
# mixture of experts


def route(logits: torch.Tensor, top_k: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing with an expert capacity. logits (N, E) -> weights (N, k), experts (N, k), keep (N, k).

    Weights are the softmax probabilities of the chosen experts, renormalised over the k choices when
    k > 1 (Mixtral); with k = 1 the raw probability scales the output so the router gets a gradient
    (Switch). Each expert takes at most ``capacity`` assignments: first choices of all tokens are
    served before second choices, in token order (GShard); the overflow is dropped (``keep`` False)
    and that token's FFN contribution from that expert is zero (the residual still carries it).
    """
    probs = logits.float().softmax(dim=-1)                                  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)                            # (N, k)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if capacity is None:
        return weights, experts, torch.ones_like(experts, dtype=torch.bool)
    onehot = F.one_hot(experts, logits.shape[-1])                           # (N, k, E)
    by_choice = onehot.transpose(0, 1).reshape(-1, logits.shape[-1])        # (k*N, E), choice-major
    slot = (by_choice.cumsum(dim=0) - 1) * by_choice                         # place in the expert's queue
    keep = ((slot < capacity) & (by_choice > 0)).any(dim=-1)                # (k*N,)
    keep = keep.view(top_k, -1).transpose(0, 1)                             # (N, k)
    return weights, experts, keep


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4).

    f_e is the fraction of the N*k routing assignments that picked expert e (before capacity drops),
    P_e the mean router probability of e. It equals 1 for perfectly uniform routing and grows as the
    routing concentrates (up to E).
    """
    n_exp = probs.shape[-1]
    f = F.one_hot(experts, n_exp).float().mean(dim=(0, 1))                   # (E,)
    p = probs.float().mean(dim=0)                                            # (E,)
    return n_exp * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits (Zoph et al. 2022), keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """A mixture of ``n_experts`` FFNs with a linear top-k router; stores its auxiliary losses in ``aux``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_ffn(cfg) for _ in range(cfg.n_experts))
        self.aux: dict[str, torch.Tensor] = {}

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments one expert takes: ceil(factor * N * k / E) in training; unlimited in eval mode, so
        that inference does not depend on what else is in the batch (and KV-cache decoding is exact)."""
        if self.cfg.moe_capacity_factor <= 0 or not self.training:
            return None
        return max(1, math.ceil(self.cfg.moe_capacity_factor * n_tokens * self.cfg.moe_top_k / self.cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                     # (N, C)
        logits = self.router(flat)                                          # (N, E)
        weights, experts, keep = route(logits, self.cfg.moe_top_k, self.capacity(flat.shape[0]))
        self.aux = {"load_balance": load_balancing_loss(logits.float().softmax(-1), experts),
                    "z": router_z_loss(logits),
                    "dropped": 1.0 - keep.float().mean()}
        out = torch.zeros_like(flat)
        weights = (weights * keep).to(x.dtype)                              # dropped assignments weigh 0
        for e, expert in enumerate(self.experts):
            token, choice = torch.where((experts == e) & keep)              # assignments served by e
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * weights[token, choice, None]          # (n_e, C)
            out.index_add_(0, token, y)
        return out.view(shape)


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Mean over all MoE layers of ``model`` (encoder and decoder alike) of the last forward's
    load-balancing and z losses and the dropped-assignment fraction (empty for dense models)."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.aux]
    if not moes:
        return {}
    return {key: torch.stack([m.aux[key] for m in moes]).mean() for key in ("load_balance", "z", "dropped")}


def add_aux_losses(loss: torch.Tensor, aux: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The one place the auxiliary terms join the task loss:
    ``loss + moe_aux_loss_coef * load_balance + moe_z_loss_coef * z`` (unchanged for dense models)."""
    if not aux:
        return loss
    return loss + cfg.moe_aux_loss_coef * aux["load_balance"] + cfg.moe_z_loss_coef * aux["z"]


# ----------------------------------------------------------------------------------------------------
# the residual block


class Block(nn.Module):
    """Self-attention (+ cross-attention) + FFN, each in a residual branch, pre- or post-norm.

    pre-norm:  x = x + f(norm(x))      (GPT-2, Llama)
    post-norm: x = norm(x + f(x))      (BERT, BART)
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, cross: bool = False):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.attn = Attention(cfg, layer_idx=layer_idx)
        self.norm_attn = make_norm(cfg)
        self.cross = Attention(cfg, cross=True, layer_idx=layer_idx) if cross else None
        self.norm_cross = make_norm(cfg) if cross else None
        self.ffn = MoE(cfg) if cfg.n_experts else make_ffn(cfg)
        self.norm_ffn = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, f, *args) -> torch.Tensor:
        if self.pre:
            return x + self._drop(f(norm(x), *args))
        return norm(x + self._drop(f(x, *args)))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # dropout is the identity in eval mode or at p=0: skip the module call (per-step decode overhead)
        return self.drop(x) if self.training and self.drop.p > 0 else x

    def forward(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        x = self._residual(x, self.norm_attn, self.attn, inp)
        if self.cross is not None:
            x = self._residual(x, self.norm_cross, self.cross, inp)
        return self._residual(x, self.norm_ffn, self.ffn)


# ----------------------------------------------------------------------------------------------------
# embeddings


class Embeddings(nn.Module):
    """Token (+ learned/sinusoidal position) (+ token type) embeddings, optional scale, norm and dropout."""

    def __init__(self, cfg: ModelConfig, tok: nn.Embedding | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok = tok if tok is not None else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len + cfg.pos_offset, cfg.d_model) if cfg.pos == "learned" else None
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(input_ids)                                             # (B, T, C)
        if self.scale != 1.0:
            x = x * self.scale
        if self.pos is not None:
            x = x + self.pos(position_ids + self.cfg.pos_offset)
        elif self.cfg.pos == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.cfg.d_model).to(x.dtype)
        if self.segment is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.segment(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


def positions_from_mask(key_mask: torch.Tensor | None, past: int, t: int, device: torch.device) -> torch.Tensor:
    """Position ids (B or 1, T) of the T newest tokens: their index among the real (unpadded) tokens.

    With left padding a row's first real token gets position 0, so a padded batch gives the same
    logits as each sequence alone.
    """
    if key_mask is None:
        return torch.arange(past, past + t, device=device)[None]
    return (key_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, past:past + t]


# ----------------------------------------------------------------------------------------------------
# weight init and the sizes every model reports


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialise every weight of an lmstack model in place. The rules (GPT-2 / nanoGPT):

    - linear and embedding weights ~ N(0, init_std) (0.02 by default), biases 0;
    - the last linear of each residual branch (attention ``o``, FFN ``down``, every expert's ``down``)
      ~ N(0, init_std / sqrt(2 * L)), L the number of blocks, so the residual stream's variance stays
      about constant with depth (each block adds two branches);
    - LayerNorm / RMSNorm weights 1, biases 0; a tied output head shares the embedding's init.
    """
    cfg = model.config
    n_blocks = cfg.n_layer + (cfg.n_encoder_layer or cfg.n_layer if cfg.arch == "encoder-decoder" else 0)
    residual_std = cfg.init_std / math.sqrt(2 * n_blocks)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_out = name.endswith(".o") or name.endswith(".down")
            nn.init.normal_(module.weight, 0.0, residual_std if is_out else cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, cfg.init_std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith("lm_head_bias"):
            nn.init.zeros_(p)


def retie_weights(model: nn.Module) -> None:
    """Re-share tied weights (output head = token embedding) after ``load_state_dict(assign=True)``
    replaced parameters, as loading onto a model built on the meta device does."""
    for m in model.modules():
        lm_head, embed = getattr(m, "lm_head", None), getattr(m, "embed", None)
        if lm_head is not None and embed is not None and m.config.tie_embeddings:
            lm_head.weight = embed.tok.weight


class SizesMixin:
    """``num_parameters``, ``flops_per_token``, ``kv_cache_bytes_per_token`` for any model with ``config``."""

    config: ModelConfig

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without token/position embedding tables."""
        params = {id(p): p for p in self.parameters()}  # type: ignore[attr-defined]
        if exclude_embeddings:
            for m in self.modules():  # type: ignore[attr-defined]
                if isinstance(m, nn.Embedding):
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, see :meth:`ModelConfig.flops_per_token`."""
        return self.config.flops_per_token(seq_len)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.config.kv_cache_bytes_per_token(dtype)
