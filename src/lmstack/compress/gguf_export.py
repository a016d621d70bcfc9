"""GGUF export of a Llama-architecture model, quantized layers kept in their codes where GGUF has the format.

GGUF (llama.cpp's file format) is what Hugging Face transformers reads quantized weights from
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf")``, which dequantizes them) and what
llama.cpp runs. The mapping from :class:`~lmstack.compress.quantize.QuantLinear` formats is exact in the
codes; only the scales are rounded to fp16, the type GGUF stores them in:

- ``int8`` (one scale per row) -> ``Q8_0`` (blocks of 32 int8 codes and an fp16 scale ``d``; ``w = q * d``):
  every block of a row gets the row's scale;
- ``int4`` symmetric, group size a multiple of 32 -> ``Q4_0`` (``w = (q - 8) * d``, 32 four-bit codes a block,
  the first 16 in the low nibbles), our ``(c - 8) * s`` with ``d = s``;
- ``int4`` asymmetric, group size a multiple of 32 -> ``Q4_1`` (``w = q * d + m``), our ``c * s + m``;
- everything else (float linears, norms, embeddings, NF4, AWQ layers with an input scale, groups that are not
  a multiple of 32) -> ``F32``, dequantized; :func:`export_gguf` returns the type of every tensor.

The query and key rows are permuted into GGML's rotary layout (pairs of adjacent dimensions) the way llama.cpp's
``convert_hf_to_gguf.py`` does, which transformers undoes on load. The tokenizer is not embedded (the folder's
``tokenizer.json`` stays the tokenizer), so llama.cpp itself would also need the ``tokenizer.ggml.*`` keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmstack.errors import ConfigError, LmstackError

BLOCK = 32          # weights per block in Q8_0, Q4_0 and Q4_1


def _gguf():
    from lmstack.extras import require

    return require("gguf", "GGUF export")


def check_exportable(cfg: Any) -> None:
    """A one-line error unless ``cfg`` is a plain Llama-architecture decoder (what GGUF's ``llama`` describes)."""
    def bad(field: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"gguf export: {field}={value!r} is not a Llama-architecture model ({want})")

    checks = [("arch", cfg.arch, "decoder"), ("pos", cfg.pos, "rope"), ("norm", cfg.norm, "rmsnorm"),
              ("ffn", cfg.ffn, "swiglu"), ("activation", cfg.activation, "silu"), ("bias", cfg.bias, False),
              ("qkv_bias", cfg.attn_qkv_bias, False), ("n_experts", cfg.n_experts, 0),
              ("rope_scaling", cfg.rope_scaling, "none"), ("norm_position", cfg.norm_position, "pre")]
    for field, value, want in checks:
        if value != want:
            raise bad(field, value, f"needs {field}={want!r}")


def _llama_permute(rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's permute for q/k: per head, (2, D/2) -> (D/2, 2)."""
    idx = torch.arange(rows)
    return idx.view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _row_form(q: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(GGUF type name, codes (out, in), per-block scales (out, in/32), per-block minima or None) for a
    QuantLinear GGUF stores exactly, else None."""
    from lmstack.compress.quantize import unpack4

    if q.in_features % BLOCK or q.input_scale is not None:
        return None
    per = q.in_features // BLOCK
    if q.mode == "int8":
        return "Q8_0", q.codes, q.scales.view(-1, 1).expand(-1, per), None
    if q.mode == "int4" and q.group_size % BLOCK == 0:
        rep = q.group_size // BLOCK                    # blocks per group: each takes its group's scale
        scales = q.scales.squeeze(-1).repeat_interleave(rep, dim=1)
        mins = None if q.symmetric else q.mins.squeeze(-1).repeat_interleave(rep, dim=1)
        return ("Q4_0" if q.symmetric else "Q4_1"), unpack4(q.codes), scales, mins
    return None


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def encode_blocks(kind: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> np.ndarray:
    """GGUF block bytes (out, blocks * bytes per block) of codes (out, in) with per-block scales (out, in/32)."""
    out, n = codes.shape
    nb = n // BLOCK
    d = _f16_bytes(scales)                                                  # (out, nb, 2)
    if kind == "Q8_0":
        qs = codes.to(torch.int8).numpy().view(np.uint8).reshape(out, nb, BLOCK)
        parts = [d, qs]
    else:
        c = codes.to(torch.uint8).numpy().reshape(out, nb, BLOCK)
        qs = c[..., :BLOCK // 2] | (c[..., BLOCK // 2:] << np.uint8(4))      # low nibbles: the first 16
        parts = [d, qs] if kind == "Q4_0" else [d, _f16_bytes(mins), qs]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out, -1))


def export_gguf(model: nn.Module, path: str | os.PathLike, name: str = "lmstack") -> dict[str, str]:
    """Write ``model`` (float or quantized, Llama architecture) to the GGUF file ``path``; returns
    ``{gguf tensor name: type}`` ("Q8_0", "Q4_0", "Q4_1" or "F32"). See the module docstring."""
    from lmstack.compress.quantize import QuantLinear
    from lmstack.model.hf import weight_table
    from lmstack.runs import atomic_path

    gguf = _gguf()
    cfg = model.config
    check_exportable(cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    modules = dict(model.named_modules())
    state = model.state_dict()
    tensors: list[tuple[str, np.ndarray, Any]] = []
    types: dict[str, str] = {}
    for ours, hf_names, _, sizes in weight_table(cfg, "llama"):
        mod = modules.get(ours.rsplit(".", 1)[0])
        form = _row_form(mod) if isinstance(mod, QuantLinear) else None
        if form is None:   # float, or a format GGUF has no exact counterpart for: dequantized fp32
            full = mod.dequantize() if isinstance(mod, QuantLinear) else state[ours]
            pieces = [(full.detach().float().cpu(), None, None)]
        else:
            pieces = [(form[1], form[2], form[3])]
        if sizes and len(hf_names) > 1:    # qkv -> q, k, v; gate_up -> gate, up: a split of the rows
            pieces = [tuple(None if t is None else t.split(sizes, dim=0)[i] for t in pieces[0])
                      for i in range(len(hf_names))]
        for hf_name, (a, s, m) in zip(hf_names, pieces):
            base, suffix = hf_name.rsplit(".", 1)
            gname = names.get_name(base)
            if gname is None:
                raise LmstackError(f"gguf export: no GGUF name for {hf_name}")
            gname = f"{gname}.{suffix}"
            heads = cfg.n_head if ".attn_q." in gname else cfg.n_kv_head if ".attn_k." in gname else None
            if heads is not None:
                perm = _llama_permute(a.shape[0], heads)
                a, s, m = (None if t is None else t[perm] for t in (a, s, m))
            if form is None:
                tensors.append((gname, np.ascontiguousarray(a.numpy()), None))
                types[gname] = "F32"
            else:
                kind = form[0]
                tensors.append((gname, encode_blocks(kind, a, s, m), getattr(gguf.GGMLQuantizationType, kind)))
                types[gname] = kind
    kinds = {t for t in types.values() if t != "F32"}
    ftype = gguf.LlamaFileType[f"MOSTLY_{kinds.pop()}"] if len(kinds) == 1 else gguf.LlamaFileType.ALL_F32
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(int(ftype))
        for gname, data, raw in tensors:
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return types
