"""The one typed model config, its presets, and the sizes computed from it (parameters, FLOPs, KV bytes).

A ``ModelConfig`` describes all three architectures (``arch``): ``decoder`` (GPT-2, Llama, Mistral,
Qwen2), ``encoder`` (BERT) and ``encoder-decoder`` (BART). Fields that only make sense for one
architecture are ignored by the others (e.g. ``n_encoder_layer`` outside ``encoder-decoder``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmstack.config import check_literals
from lmstack.errors import ConfigError

@dataclass
class ModelConfig:
    """Every knob of the transformer family. Validated on construction; errors name the field."""

    arch: Literal["decoder", "encoder", "encoder-decoder"] = "decoder"
    vocab_size: int = 50304
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None        # None = n_head (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None         # None = d_model // n_head
    d_ff: int | None = None             # None = 4 * d_model (gelu) or 8/3 * d_model rounded to 64 (swiglu)
    ffn: Literal["mlp", "swiglu"] = "mlp"
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False            # LayerNorm right after the embeddings (BERT, BART)
    final_norm: bool = True             # norm after the last block (pre-norm models)
    dropout: float = 0.0
    bias: bool = True                   # biases on the linear layers
    qkv_bias: bool | None = None        # None = follow ``bias`` (Qwen2: bias=False, qkv_bias=True)
    norm_bias: bool = True              # LayerNorm bias (RMSNorm never has one)
    tie_embeddings: bool = True
    lm_head_bias: bool = False          # bias on the output projection (BERT MLM, BART final_logits_bias)
    max_seq_len: int = 1024
    # local attention: decoder: a query sees the `sliding_window` newest positions up to itself (q - k < w,
    # Mistral/Qwen2); encoder: a band |q - k| <= w. None = full attention.
    sliding_window: int | None = None
    max_window_layers: int = 0          # layers with index >= this use the window (HF Qwen2); 0 = all (Mistral)
    pos: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
    pos_offset: int = 0                 # learned position table index offset (BART uses 2)
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "linear", "ntk", "dynamic", "llama3", "yarn"] = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int | None = None  # dynamic/llama3/yarn: pretraining context (None = max_seq_len)
    rope_low_freq_factor: float = 1.0     # llama3: wavelengths > original/low are divided by the factor
    rope_high_freq_factor: float = 4.0    # llama3: wavelengths < original/high are kept; a ramp in between
    rope_beta_fast: float = 32.0          # yarn: rotations over the original context above which dims are kept
    rope_beta_slow: float = 1.0           # yarn: ... and below which dims are divided by the factor
    rope_attn_factor: float | None = None  # yarn: cos/sin multiplier; None = 0.1 * ln(factor) + 1
    embed_scale: bool = False           # multiply token embeddings by sqrt(d_model) (BART scale_embedding)
    type_vocab_size: int = 0            # token-type (segment) embeddings, BERT: 2
    n_encoder_layer: int | None = None  # encoder-decoder: encoder depth (None = n_layer)
    mlm_head: bool = False              # encoder: dense+act+norm transform before the vocab projection (BERT)
    pooler: bool = False                # encoder: tanh pooler on the first token (BERT)
    n_labels: int = 0                   # encoder: sequence-classification head (1 = cross-encoder score)
    # mixture of experts (0 experts = dense FFN)
    n_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25   # <= 0: no capacity limit (no token is dropped)
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    init_std: float = 0.02
    attn_impl: Literal["sdpa", "reference"] = "sdpa"
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"model config field {field!r}: {why} (got {getattr(self, field)!r})")

        check_literals(self)  # the choices live once, in the Literal annotations
        for field in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            if getattr(self, field) < 1:
                raise bad(field, "must be a positive integer")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise bad("n_head", f"must divide d_model={self.d_model} (or set head_dim)")
            self.head_dim = self.d_model // self.n_head
        if self.head_dim < 1:
            raise bad("head_dim", "must be positive")
        if self.pos == "rope" and self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise bad("d_model", "must be even for sinusoidal positions")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.ffn == "mlp" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_ff < 1:
            raise bad("d_ff", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be positive")
        if self.rope_scaling != "none" and self.rope_scaling_factor < 1.0:
            raise bad("rope_scaling_factor", "must be >= 1 when rope_scaling is set")
        if self.rope_original_max_len is not None and self.rope_original_max_len < 1:
            raise bad("rope_original_max_len", "must be a positive integer")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise bad("rope_high_freq_factor", f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} > 0")
        if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise bad("rope_beta_fast", f"must be >= rope_beta_slow={self.rope_beta_slow} > 0")
        if self.rope_attn_factor is not None and self.rope_attn_factor <= 0:
            raise bad("rope_attn_factor", "must be positive")
        if self.pos_offset < 0:
            raise bad("pos_offset", "must be >= 0")
        if self.n_experts < 0 or self.n_experts == 1:
            raise bad("n_experts", "must be 0 (dense) or at least 2")
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise bad("moe_top_k", f"must be in [1, n_experts={self.n_experts}]")
        if self.n_encoder_layer is not None and self.n_encoder_layer < 1:
            raise bad("n_encoder_layer", "must be a positive integer")
        if self.n_labels < 0:
            raise bad("n_labels", "must be >= 0")
        if self.type_vocab_size < 0:
            raise bad("type_vocab_size", "must be >= 0")
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise bad("sliding_window", "must be a positive integer (or null for full attention)")
            if self.sliding_window > self.max_seq_len:
                raise bad("sliding_window", f"is larger than the context max_seq_len={self.max_seq_len}, so it "
                                            "would never apply: lower it or set it to null for full attention")
            if self.arch == "encoder-decoder":
                raise bad("sliding_window", "is implemented for decoder and encoder models, not encoder-decoder")
        if self.max_window_layers < 0:
            raise bad("max_window_layers", "must be >= 0 (0 = every layer uses sliding_window)")

    def uses_window(self, layer_idx: int) -> bool:
        """Whether self-attention of layer ``layer_idx`` is local (``sliding_window``, ``max_window_layers``)."""
        return self.sliding_window is not None and layer_idx >= self.max_window_layers

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def attn_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V one token adds to a decoder's KV cache: 2 * layers * kv_heads * head_dim * size."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * itemsize

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) for MFU: ``6 * N_active + 12 * L * H * hd * T``.

        ``N_active`` counts the weights a token multiplies through (linear layers and the output head,
        only ``moe_top_k`` experts and the router per MoE layer; not the embedding lookups, the position
        tables or the norms). The attention term is the QK^T and AV products over ``seq_len`` keys,
        forward (2 matmuls * 2 FLOPs) times 3 for the backward, not halved for causal masking (as in
        the PaLM paper's MFU appendix). For encoder-decoder models both stacks are counted and the
        attention term uses ``seq_len`` for every stack.
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        n_attn_layers = self.n_layer
        if self.arch == "encoder-decoder":
            n_attn_layers += self.n_encoder_layer or self.n_layer
        return 6.0 * self.active_matmul_params() + 12.0 * n_attn_layers * self.q_dim * seq_len

    def active_matmul_params(self) -> int:
        """Weights one token multiplies through (see :meth:`flops_per_token`)."""
        d = self.d_model
        attn = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d
        ffn_one = d * self.d_ff * (3 if self.ffn == "swiglu" else 2)
        ffn = ffn_one * self.moe_top_k + d * self.n_experts if self.n_experts else ffn_one
        n_enc = self.n_encoder_layer or self.n_layer
        if self.arch == "encoder-decoder":
            cross = d * self.q_dim + d * 2 * self.kv_dim + self.q_dim * d
            body = n_enc * (attn + ffn) + self.n_layer * (attn + cross + ffn)
        else:
            body = self.n_layer * (attn + ffn)
        head = d * self.vocab_size if self.arch != "encoder" or self.mlm_head else 0
        return body + head

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU in minutes: a ~1M-parameter GPT-style model for the speedrun and tests.
    "tiny": dict(arch="decoder", vocab_size=4096, d_model=128, n_layer=4, n_head=4, max_seq_len=256,
                 pos="rope", norm="rmsnorm", ffn="swiglu", activation="silu", bias=False,
                 tie_embeddings=True),
    # Small: ~30M parameters, a laptop-sized Llama-style model.
    "small": dict(arch="decoder", vocab_size=32000, d_model=512, n_layer=8, n_head=8, n_kv_head=4,
                  max_seq_len=1024, pos="rope", norm="rmsnorm", ffn="swiglu", activation="silu",
                  bias=False, tie_embeddings=True),
    # GPT-2 small exactly (124M with the 50257 vocabulary).
    "gpt2-124m": dict(arch="decoder", vocab_size=50257, d_model=768, n_layer=12, n_head=12, max_seq_len=1024,
                      pos="learned", norm="layernorm", ffn="mlp", activation="gelu_tanh", bias=True,
                      tie_embeddings=True),
    # A Llama-style model of GPT-2-small size: RoPE, RMSNorm, SwiGLU, GQA, no biases.
    "llama-style-125m": dict(arch="decoder", vocab_size=32000, d_model=768, n_layer=12, n_head=12, n_kv_head=4,
                             d_ff=2048, max_seq_len=2048, pos="rope", norm="rmsnorm", norm_eps=1e-6,
                             ffn="swiglu", activation="silu", bias=False, tie_embeddings=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (``tiny``, ``small``, ``gpt2-124m``, ``llama-style-125m``) with optional overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
