"""Hugging Face checkpoints in and out: ``load(folder) -> model`` and ``save(model, folder)``.

Families (``model_type`` in config.json):

- ``gpt2``: learned positions, pre-LayerNorm, GELU-tanh MLP, Conv1D weights (transposed here), tied head;
- ``llama``, ``mistral``, ``qwen2``: RoPE, RMSNorm, SwiGLU, GQA; Qwen2 has QKV biases; Mistral's
  ``sliding_window`` (every layer) and Qwen2's (``use_sliding_window``, layers from ``max_window_layers``
  on, or the equivalent ``layer_types``) load into ``sliding_window`` / ``max_window_layers`` and export
  back (a windowed Llama-style model exports as Mistral); a window at least the context long is full
  attention and loads as none;
- ``bert``: post-LayerNorm encoder with token types, MLM head, pooler and classifier when present;
  sentence-transformers folders (``modules.json``) load their Transformer module;
- ``bart``: post-LayerNorm encoder-decoder with learned positions (offset 2) and ``final_logits_bias``.
  (T5 is not supported: its bucketed relative position bias is not one of our position encodings.)

RoPE scaling types ``linear``, ``dynamic``, ``llama3`` (Llama 3.x) and ``yarn`` load and export; anything else,
or a config value we do not implement (e.g. ``rope_parameters.rope_type = "longrope"``),
fails with a :class:`ConfigError` naming the field. The weight names map through one table per family
(:func:`weight_table`), used in both directions, so load and save cannot drift apart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.layers import retie_weights

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "bert", "bart")
ACTS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "relu": "relu", "silu": "silu", "swish": "silu"}
ACTS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids")


def _unsupported(field: str, value: Any, why: str = "") -> ConfigError:
    return ConfigError(f"Hugging Face config field {field!r}={value!r} is not supported{': ' + why if why else ''}")


# ---------------------------------------------------------------------------------------------------- configs


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    params = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters"
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        field = "rope_scaling"
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    max_pos = hf.get("max_position_embeddings", 2048)
    # as transformers: a top-level original_max_position_embeddings (Phi-3 style) wins over the rope dict's
    orig = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos)
    if kind == "linear":
        out.update(rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]), rope_original_max_len=orig,
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
        if params.get("truncate", True) is False:
            raise _unsupported(f"{field}.truncate", False, "only truncated YaRN correction ranges are implemented")
        factor = float(params.get("factor") or max_pos / orig)
        attn = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attn is None and mscale and mscale_all_dim and factor > 1:   # DeepSeek-style ratio of two mscales
            attn = (0.1 * mscale * math.log(factor) + 1.0) / (0.1 * mscale_all_dim * math.log(factor) + 1.0)
        out.update(rope_scaling="yarn", rope_scaling_factor=factor, rope_original_max_len=orig,
                   rope_beta_fast=float(params.get("beta_fast") or 32.0),
                   rope_beta_slow=float(params.get("beta_slow") or 1.0),
                   rope_attn_factor=None if attn is None else float(attn))
    elif kind == "dynamic":   # transformers measures the growth against max_position_embeddings
        out.update(rope_scaling="dynamic", rope_scaling_factor=float(params["factor"]), rope_original_max_len=max_pos)
    elif kind != "default":
        raise _unsupported(f"{field}.rope_type", kind, "only default, linear, dynamic, llama3 and yarn RoPE load "
                           "from Hugging Face")
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``rope_parameters`` dict of ``cfg`` (the inverse of :func:`_rope`)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    orig = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.rope_scaling in ("linear", "dynamic"):
        rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=orig)
    elif cfg.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope_scaling_factor, original_max_position_embeddings=orig,
                    beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attn_factor is not None:
            rope["attention_factor"] = cfg.rope_attn_factor
    elif cfg.rope_scaling == "ntk":
        raise _unsupported_export("rope_scaling", "ntk", "static NTK scaling has no Hugging Face equivalent")
    return rope


def _window(hf: dict[str, Any], family: str, max_len: int) -> tuple[int | None, int]:
    """(sliding_window, max_window_layers) of a Llama-family config, as transformers applies them:
    Mistral windows every layer; Qwen2 only with ``use_sliding_window``, the layers from
    ``max_window_layers`` on (or those ``layer_types`` names ``sliding_attention``, which must be a suffix)."""
    window = hf.get("sliding_window") if family in ("mistral", "qwen2") else None
    first = 0
    if family == "qwen2" and window:
        n_layer = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if not hf.get("use_sliding_window"):
            window = None
        elif types:
            local = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
            first = local[0] if local else n_layer
            if local != list(range(first, n_layer)):
                raise _unsupported("layer_types", types, "sliding-window layers must be the last ones "
                                   "(layers >= max_window_layers)")
        else:
            first = int(hf.get("max_window_layers", 28))
        if first >= n_layer:                # no layer uses it
            window = None
    if not window or window >= max_len:     # a window as long as the context hides nothing
        return None, 0
    return int(window), first


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a Hugging Face ``config.json`` dict."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _unsupported("model_type", family, f"supported: {', '.join(FAMILIES)}")
    act_name = hf.get("activation_function", hf.get("hidden_act", "gelu"))
    if act_name not in ACTS_IN:
        raise _unsupported("activation_function" if family in ("gpt2", "bart") else "hidden_act", act_name)
    act = ACTS_IN[act_name]
    if family == "gpt2":
        for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(field):
                raise _unsupported(field, hf[field])
        if hf.get("scale_attn_weights", True) is False:
            raise _unsupported("scale_attn_weights", False)
        return ModelConfig(arch="decoder", vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"], ffn="mlp",
                           activation=act, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           max_seq_len=hf.get("n_positions", 1024), pos="learned",
                           pad_token_id=hf.get("pad_token_id"))
    if family in ("llama", "mistral", "qwen2"):
        if act != "silu":
            raise _unsupported("hidden_act", act_name, "the Llama family uses silu (SwiGLU)")
        if hf.get("mlp_bias"):
            raise _unsupported("mlp_bias", True)
        if hf.get("pretraining_tp", 1) != 1:
            raise _unsupported("pretraining_tp", hf["pretraining_tp"])
        max_len = hf.get("max_position_embeddings", 2048)
        window, first = _window(hf, family, max_len)
        n_head = hf["num_attention_heads"]
        qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
        o_bias = bool(hf.get("attention_bias", False)) if family == "llama" else False
        return ModelConfig(arch="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                           n_layer=hf["num_hidden_layers"], n_head=n_head,
                           n_kv_head=hf.get("num_key_value_heads") or n_head,
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, d_ff=hf["intermediate_size"],
                           ffn="swiglu", activation="silu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                           bias=o_bias, qkv_bias=qkv_bias, tie_embeddings=hf.get("tie_word_embeddings", False),
                           max_seq_len=max_len, pos="rope", pad_token_id=hf.get("pad_token_id"),
                           sliding_window=window, max_window_layers=first, **_rope(hf))
    if family == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise _unsupported("position_embedding_type", hf["position_embedding_type"])
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise _unsupported("is_decoder", True, "BERT loads as an encoder")
        return ModelConfig(arch="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                           n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           d_ff=hf["intermediate_size"], ffn="mlp", activation=act, norm="layernorm",
                           norm_position="post", norm_eps=hf.get("layer_norm_eps", 1e-12), embed_norm=True,
                           final_norm=False, bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           lm_head_bias=True, max_seq_len=hf.get("max_position_embeddings", 512), pos="learned",
                           type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0))
    # bart
    for field in ("normalize_before", "add_final_layer_norm", "add_bias_logits"):
        if hf.get(field):
            raise _unsupported(field, hf[field], "that is mBART / a BART variant")
    if hf["encoder_attention_heads"] != hf["decoder_attention_heads"]:
        raise _unsupported("decoder_attention_heads", hf["decoder_attention_heads"], "must equal the encoder's")
    if hf["encoder_ffn_dim"] != hf["decoder_ffn_dim"]:
        raise _unsupported("decoder_ffn_dim", hf["decoder_ffn_dim"], "must equal encoder_ffn_dim")
    return ModelConfig(arch="encoder-decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
                       n_layer=hf["decoder_layers"], n_encoder_layer=hf["encoder_layers"],
                       n_head=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"], ffn="mlp", activation=act,
                       norm="layernorm", norm_position="post", norm_eps=1e-5, embed_norm=True, final_norm=False,
                       bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), lm_head_bias=True,
                       max_seq_len=hf.get("max_position_embeddings", 1024), pos="learned", pos_offset=2,
                       embed_scale=bool(hf.get("scale_embedding", False)), pad_token_id=hf.get("pad_token_id", 1))


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face family an lmstack config exports to; ConfigError naming the field that prevents it."""
    if cfg.n_experts:
        raise _unsupported_export("n_experts", cfg.n_experts)
    if cfg.arch == "encoder":
        want = dict(pos="learned", norm="layernorm", norm_position="post", ffn="mlp", embed_norm=True, bias=True)
        family = "bert"
    elif cfg.arch == "encoder-decoder":
        want = dict(pos="learned", pos_offset=2, norm="layernorm", norm_position="post", ffn="mlp", embed_norm=True,
                    bias=True)
        family = "bart"
    elif cfg.pos == "learned":
        want = dict(norm="layernorm", norm_position="pre", ffn="mlp", bias=True, embed_norm=False, pos_offset=0,
                    tie_embeddings=True)
        family = "gpt2"
    else:
        want = dict(pos="rope", norm="rmsnorm", norm_position="pre", ffn="swiglu", activation="silu",
                    embed_norm=False, lm_head_bias=False)
        family = "qwen2" if cfg.attn_qkv_bias and not cfg.bias else "llama"
        if cfg.sliding_window is not None and family == "llama":
            family = "mistral"      # Mistral: a Llama without biases, every layer windowed
            want.update(bias=False, max_window_layers=0)
            if cfg.attn_qkv_bias:
                raise _unsupported_export("qkv_bias", cfg.qkv_bias, "a windowed model exports as Mistral "
                                          "(no biases) or Qwen2 (qkv_bias=true, bias=false)")
    for field, value in want.items():
        if getattr(cfg, field) != value:
            raise _unsupported_export(field, getattr(cfg, field), f"{family} needs {value!r}")
    if cfg.sliding_window is not None and family not in ("mistral", "qwen2"):
        raise _unsupported_export("sliding_window", cfg.sliding_window, f"{family} has no sliding window")
    if family in ("gpt2", "bert", "bart") and cfg.n_head * cfg.head_dim != cfg.d_model:
        # these configs have no head_dim field: HF derives it as d_model / n_head (head-pruned models differ)
        raise _unsupported_export("head_dim", cfg.head_dim, f"{family} needs d_model / n_head = "
                                                           f"{cfg.d_model / cfg.n_head:g}")
    if cfg.dropout:
        pass  # dropout is a training setting; exported as the HF dropout fields
    return family


def _unsupported_export(field: str, value: Any, why: str = "") -> ConfigError:
    return ConfigError(f"model config field {field!r}={value!r} cannot be exported to Hugging Face"
                       f"{': ' + why if why else ''}")


def config_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``cfg``."""
    act = ACTS_OUT[cfg.activation]
    if family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                    n_positions=cfg.max_seq_len, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    tie_word_embeddings=True, pad_token_id=cfg.pad_token_id)
    if family in ("llama", "mistral", "qwen2"):
        rope = _rope_to_hf(cfg)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
        out = dict(model_type=family, architectures=[arch],
                   vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                   num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                   head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                   rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
                   rope_theta=cfg.rope_theta, attention_dropout=cfg.dropout, pad_token_id=cfg.pad_token_id,
                   bos_token_id=None, eos_token_id=None)
        if cfg.rope_scaling == "dynamic":   # there the original context is max_position_embeddings itself
            out["max_position_embeddings"] = cfg.rope_original_max_len or cfg.max_seq_len
        if family == "llama":
            if cfg.attn_qkv_bias != cfg.bias:
                raise _unsupported_export("qkv_bias", cfg.qkv_bias, "Llama has one attention_bias for q, k, v and o")
            if cfg.sliding_window is not None:
                raise _unsupported_export("sliding_window", cfg.sliding_window, "Llama has none (Mistral and "
                                          "Qwen2 do)")
            out.update(attention_bias=cfg.bias, mlp_bias=False)
        elif family == "mistral":
            out["sliding_window"] = cfg.sliding_window
        else:
            out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                       max_window_layers=cfg.max_window_layers)
        return out
    if family == "bert":
        arch = "BertForSequenceClassification" if cfg.n_labels else "BertForMaskedLM" if cfg.mlm_head else "BertModel"
        out = dict(model_type="bert", architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                   num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                   hidden_act=act, max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                   layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
                   attention_probs_dropout_prob=cfg.dropout, pad_token_id=cfg.pad_token_id or 0,
                   tie_word_embeddings=cfg.tie_embeddings, position_embedding_type="absolute")
        if cfg.n_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_labels)}
        return out
    return dict(model_type="bart", architectures=["BartForConditionalGeneration"], vocab_size=cfg.vocab_size,
                d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layer or cfg.n_layer, decoder_layers=cfg.n_layer,
                encoder_attention_heads=cfg.n_head, decoder_attention_heads=cfg.n_head, encoder_ffn_dim=cfg.d_ff,
                decoder_ffn_dim=cfg.d_ff, activation_function=act, max_position_embeddings=cfg.max_seq_len,
                scale_embedding=cfg.embed_scale, dropout=cfg.dropout, attention_dropout=cfg.dropout,
                activation_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings,
                pad_token_id=1 if cfg.pad_token_id is None else cfg.pad_token_id, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=2)


# ---------------------------------------------------------------------------------------------------- weights

# One row: (our name, [HF names], transpose (GPT-2 Conv1D), sizes of the HF pieces along dim 0 when concatenated)
Row = tuple[str, list[str], bool, list[int] | None]


def _linear(ours: str, hf: list[str], sizes: list[int] | None = None, bias: bool = True,
            transpose: bool = False) -> list[Row]:
    rows: list[Row] = [(f"{ours}.weight", [f"{h}.weight" for h in hf], transpose, sizes)]
    if bias:
        rows.append((f"{ours}.bias", [f"{h}.bias" for h in hf], False, sizes))
    return rows


def _norm(ours: str, hf: str, bias: bool = True) -> list[Row]:
    return _linear(ours, [hf], bias=bias)


def weight_table(cfg: ModelConfig, family: str, has: set[str] | None = None) -> list[Row]:
    """The name mapping of every weight between our model and the HF family (HF names without a prefix).

    ``has`` (the HF keys present, when loading) decides the optional BERT heads.
    """
    qkv = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    rows: list[Row] = []
    if family == "gpt2":
        rows += [("embed.tok.weight", ["transformer.wte.weight"], False, None),
                 ("embed.pos.weight", ["transformer.wpe.weight"], False, None)]
        for i in range(cfg.n_layer):
            h, o = f"transformer.h.{i}", f"blocks.{i}"
            rows += _norm(f"{o}.norm_attn", f"{h}.ln_1") + _norm(f"{o}.norm_ffn", f"{h}.ln_2")
            rows += _linear(f"{o}.attn.qkv", [f"{h}.attn.c_attn"], transpose=True)
            rows += _linear(f"{o}.attn.o", [f"{h}.attn.c_proj"], transpose=True)
            rows += _linear(f"{o}.ffn.up", [f"{h}.mlp.c_fc"], transpose=True)
            rows += _linear(f"{o}.ffn.down", [f"{h}.mlp.c_proj"], transpose=True)
        rows += _norm("norm_f", "transformer.ln_f")
    elif family in ("llama", "mistral", "qwen2"):
        rows.append(("embed.tok.weight", ["model.embed_tokens.weight"], False, None))
        for i in range(cfg.n_layer):
            h, o = f"model.layers.{i}", f"blocks.{i}"
            a = f"{h}.self_attn"
            rows += _linear(f"{o}.attn.qkv", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], qkv, cfg.attn_qkv_bias)
            rows += _linear(f"{o}.attn.o", [f"{a}.o_proj"], bias=cfg.bias)
            rows += _linear(f"{o}.ffn.gate_up", [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], [cfg.d_ff] * 2, False)
            rows += _linear(f"{o}.ffn.down", [f"{h}.mlp.down_proj"], bias=False)
            rows += _norm(f"{o}.norm_attn", f"{h}.input_layernorm", bias=False)
            rows += _norm(f"{o}.norm_ffn", f"{h}.post_attention_layernorm", bias=False)
        rows += _norm("norm_f", "model.norm", bias=False)
        if not cfg.tie_embeddings:
            rows.append(("lm_head.weight", ["lm_head.weight"], False, None))
    elif family == "bert":
        e = "bert.embeddings"
        rows += [("embed.tok.weight", [f"{e}.word_embeddings.weight"], False, None),
                 ("embed.pos.weight", [f"{e}.position_embeddings.weight"], False, None),
                 ("embed.segment.weight", [f"{e}.token_type_embeddings.weight"], False, None)]
        rows += _norm("embed.norm", f"{e}.LayerNorm")
        for i in range(cfg.n_layer):
            h, o = f"bert.encoder.layer.{i}", f"blocks.{i}"
            s = f"{h}.attention.self"
            rows += _linear(f"{o}.attn.qkv", [f"{s}.query", f"{s}.key", f"{s}.value"], qkv)
            rows += _linear(f"{o}.attn.o", [f"{h}.attention.output.dense"])
            rows += _norm(f"{o}.norm_attn", f"{h}.attention.output.LayerNorm")
            rows += _linear(f"{o}.ffn.up", [f"{h}.intermediate.dense"])
            rows += _linear(f"{o}.ffn.down", [f"{h}.output.dense"])
            rows += _norm(f"{o}.norm_ffn", f"{h}.output.LayerNorm")
        if cfg.pooler:
            rows += _linear("pooler", ["bert.pooler.dense"])
        if cfg.mlm_head:
            rows += _linear("mlm.dense", ["cls.predictions.transform.dense"])
            rows += _norm("mlm.norm", "cls.predictions.transform.LayerNorm")
            rows.append(("lm_head_bias", ["cls.predictions.bias"], False, None))
            if not cfg.tie_embeddings:
                rows.append(("lm_head.weight", ["cls.predictions.decoder.weight"], False, None))
        if cfg.n_labels:
            rows += _linear("classifier", ["classifier"])
    elif family == "bart":
        rows.append(("shared.weight", ["model.shared.weight"], False, None))
        for side, n in (("encoder", cfg.n_encoder_layer or cfg.n_layer), ("decoder", cfg.n_layer)):
            m = f"model.{side}"
            rows.append((f"{side}.embed.pos.weight", [f"{m}.embed_positions.weight"], False, None))
            rows += _norm(f"{side}.embed.norm", f"{m}.layernorm_embedding")
            for i in range(n):
                h, o = f"{m}.layers.{i}", f"{side}.blocks.{i}"
                a = f"{h}.self_attn"
                rows += _linear(f"{o}.attn.qkv", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], qkv)
                rows += _linear(f"{o}.attn.o", [f"{a}.out_proj"])
                rows += _norm(f"{o}.norm_attn", f"{h}.self_attn_layer_norm")
                if side == "decoder":
                    c = f"{h}.encoder_attn"
                    rows += _linear(f"{o}.cross.q", [f"{c}.q_proj"])
                    rows += _linear(f"{o}.cross.kv", [f"{c}.k_proj", f"{c}.v_proj"], [cfg.kv_dim] * 2)
                    rows += _linear(f"{o}.cross.o", [f"{c}.out_proj"])
                    rows += _norm(f"{o}.norm_cross", f"{h}.encoder_attn_layer_norm")
                rows += _linear(f"{o}.ffn.up", [f"{h}.fc1"])
                rows += _linear(f"{o}.ffn.down", [f"{h}.fc2"])
                rows += _norm(f"{o}.norm_ffn", f"{h}.final_layer_norm")
        rows.append(("decoder.lm_head_bias", ["final_logits_bias"], False, None))
        if not cfg.tie_embeddings:
            rows.append(("decoder.lm_head.weight", ["lm_head.weight"], False, None))
    return rows


# HF checkpoints are saved from different head classes: the same weight can carry a prefix or not.
PREFIXES = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "qwen2": "model.", "bert": "bert."}


def _normalise_keys(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Add the base-model prefix where a checkpoint of the bare model (GPT2Model, BertModel...) lacks it."""
    prefix = PREFIXES.get(family)
    if prefix is None:
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        bare = not k.startswith(prefix) and not k.startswith(("lm_head.", "cls.", "classifier."))
        out[prefix + k if bare else k] = v
    return out


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights (PyTorch .bin checkpoints are not read)")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(str(folder / name)))
    return sd


def _model_folder(path: Path) -> Path:
    """The folder with config.json: ``path`` itself, or the Transformer module of a sentence-transformers folder."""
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer") and (path / module["path"] / "config.json").is_file():
                return path / module["path"]
    raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json)")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a Hugging Face checkpoint folder into our model (config attached as ``model.config``).

    Weights keep the checkpoint's dtype unless ``dtype`` is given. A sentence-transformers folder's
    pooling mode is kept as ``model.pooling`` (``mean``, ``cls`` or ``max``) and its window as
    ``model.sentence_max_length`` (``sentence_bert_config.json``) for :func:`sentence_embeddings`.
    """
    from lmstack.model import build_model

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model folder")
    folder = _model_folder(path)
    hf_cfg = json.loads((folder / "config.json").read_text())
    family = hf_cfg.get("model_type")
    sd = _read_safetensors(folder)
    cfg = config_from_hf(hf_cfg)
    if family == "bert":
        keys = set(_normalise_keys(sd, family))
        n_labels = len(hf_cfg.get("id2label") or {}) if "classifier.weight" in keys else 0
        cfg = cfg.replace(mlm_head="cls.predictions.transform.dense.weight" in keys,
                          pooler="bert.pooler.dense.weight" in keys, n_labels=n_labels)
    sd = _normalise_keys(sd, family)
    if dtype is None:
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
    with torch.device("meta"):
        model = build_model(cfg)
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, hf_names, transpose, _ in weight_table(cfg, family):
        missing = [h for h in hf_names if h not in sd]
        if missing:
            raise ConfigError(f"{folder}: weight {missing[0]!r} is missing from the checkpoint")
        parts = [sd[h].t() if transpose else sd[h] for h in hf_names]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        ours[name] = tensor.reshape(-1) if name.endswith("lm_head_bias") else tensor
        used.update(hf_names)
    extra = sorted(set(sd) - used - _tied_hf_keys(family))
    if extra:
        raise ConfigError(f"{folder}: weight {extra[0]!r} has no place in the lmstack model "
                          f"({len(extra)} unused weights; is a config field unsupported?)")
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=False, assign=True)
    retie_weights(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ConfigError(f"{folder}: no weight for {leftover[0]!r}")
    model = model.to(device)
    if (path / "1_Pooling" / "config.json").is_file():
        pool_cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
        model.pooling = ("cls" if pool_cfg.get("pooling_mode_cls_token") else
                         "max" if pool_cfg.get("pooling_mode_max_tokens") else "mean")
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file() and json.loads(st_cfg.read_text()).get("max_seq_length"):
        model.sentence_max_length = int(json.loads(st_cfg.read_text())["max_seq_length"])
    return model.eval()


def _tied_hf_keys(family: str) -> set[str]:
    """HF keys that duplicate a tied weight (the head and the per-side BART embeddings)."""
    return {"gpt2": {"lm_head.weight"}, "bert": {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"},
            "bart": {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"},
            }.get(family, {"lm_head.weight"})


def tokenizer_files(tokenizer: Any, max_len: int | None = None) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json`` and ``generation_config.json`` for a tokenizer, so that ``AutoTokenizer``
    knows BOS/EOS/PAD and HF ``generate`` stops at EOS (a tokenizer.json alone carries neither)."""
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                               "add_bos_token": bool(getattr(tokenizer, "add_bos", False))}
    gen: dict[str, Any] = {"_from_model_config": False}
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if i is not None:
            tok_cfg[f"{key}_token"] = names[i]
            gen[f"{key}_token_id"] = i
    if max_len:
        tok_cfg["model_max_length"] = int(max_len)
    return {"tokenizer_config.json": tok_cfg, "generation_config.json": gen}


def save(model: nn.Module, path: str | os.PathLike, family: str | None = None,
         dtype: torch.dtype | None = None, tokenizer: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that Hugging Face transformers loads; with ``tokenizer``
    also its ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.

    The family follows from the config (learned positions -> gpt2, RoPE -> llama or qwen2 (QKV bias
    without other biases), encoder -> bert, encoder-decoder -> bart) unless given.
    """
    from safetensors.torch import save_file

    from lmstack.runs import atomic_dir

    cfg: ModelConfig = model.config
    family = family or family_of(cfg)
    hf_cfg = config_to_hf(cfg, family)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, hf_names, transpose, sizes in weight_table(cfg, family):
        tensor = sd[name].detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        if name.endswith("lm_head_bias") and family == "bart":
            tensor = tensor[None]                                   # final_logits_bias is (1, vocab)
        pieces = tensor.split(sizes, dim=0) if sizes and len(hf_names) > 1 else [tensor]
        for h, piece in zip(hf_names, pieces):
            out[h] = (piece.t() if transpose else piece).contiguous().cpu()
    if family == "bert" and cfg.mlm_head and cfg.tie_embeddings:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    if family == "bert" and not cfg.mlm_head and not cfg.n_labels:
        out = {k[len("bert."):]: v for k, v in out.items()}         # BertModel has no prefix
    with atomic_dir(path) as tmp:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
            for name, data in tokenizer_files(tokenizer, getattr(cfg, "max_seq_len", None)).items():
                (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
