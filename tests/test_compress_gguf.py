"""GGUF export: our int8 / int4 codes become Q8_0 / Q4_0 / Q4_1 blocks exactly (scales in fp16), transformers
reads the file and its logits match our quantized model, unsupported layers fall back to F32, bad input is one line."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmstack.compress import QuantConfig, quantize_model, quantized_layers  # noqa: E402
from lmstack.compress.gguf_export import _llama_permute, export_gguf  # noqa: E402
from lmstack.errors import ConfigError  # noqa: E402
from lmstack.model import build_model, preset  # noqa: E402


def _model(qc: QuantConfig | None, tie: bool = False, d_ff: int = 128):
    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=d_ff,
                           max_seq_len=128, tie_embeddings=tie)).eval()
    if qc is not None:
        quantize_model(m, qc)
        for q in quantized_layers(m).values():      # fp16 scales: then the export is exact, bit for bit
            q.scales.copy_(q.scales.half().float())
            if not q.symmetric:
                q.mins.copy_(q.mins.half().float())
    return m


CASES = {"int8": (QuantConfig("int8"), "Q8_0"), "int4-g32": (QuantConfig("int4", 32), "Q4_0"),
         "int4-g64": (QuantConfig("int4", 64), "Q4_0"),
         "int4-g32-asym": (QuantConfig("int4", 32, symmetric=False), "Q4_1")}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_codes_become_gguf_blocks_exactly(tmp_path, case):
    qc, kind = CASES[case]
    m = _model(qc)
    types = export_gguf(m, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    layer = m.blocks[1]
    qkv = layer.attn.qkv.dequantize()
    q_rows, k_rows = qkv[:m.config.q_dim], qkv[m.config.q_dim:m.config.q_dim + m.config.kv_dim]
    want = {"blk.1.attn_q.weight": q_rows[_llama_permute(q_rows.shape[0], 4)],
            "blk.1.attn_k.weight": k_rows[_llama_permute(k_rows.shape[0], 2)],
            "blk.1.attn_output.weight": layer.attn.o.dequantize(),
            "blk.1.ffn_down.weight": layer.ffn.down.dequantize(),
            "blk.1.ffn_up.weight": layer.ffn.gate_up.dequantize()[m.config.d_ff:]}
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type.name == kind and types[name] == kind
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        np.testing.assert_array_equal(got, w.numpy())
    assert types["token_embd.weight"] == "F32" and types["output.weight"] == "F32"   # embedding and head stay


@pytest.mark.parametrize("case", ["float", "int8", "int4-g32", "int4-g32-asym", "nf4"])
def test_transformers_reads_the_gguf_and_its_logits_match(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    qc = None if case == "float" else QuantConfig("nf4", 32) if case == "nf4" else CASES[case][0]
    m = _model(qc, tie=case == "int8")
    types = export_gguf(m, tmp_path / "m.gguf")
    if case in ("float", "nf4"):
        assert set(types.values()) == {"F32"}              # no exact GGUF format for NF4: dequantized
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert hf.config.tie_word_embeddings == (case == "int8")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = m(x).float(), hf(x).logits.float()
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


def test_layers_that_no_gguf_block_fits_fall_back_to_f32(tmp_path):
    # d_ff = 80: the down projection is 80 wide, no multiple of the 32-weight block
    m = _model(QuantConfig("int8"), d_ff=80)
    types = export_gguf(m, tmp_path / "m.gguf")
    assert types["blk.0.ffn_down.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_a_non_llama_model_is_a_one_line_error(tmp_path):
    m = build_model(preset("tiny", vocab_size=64, d_model=32, n_layer=1, n_head=2, pos="learned", norm="layernorm",
                           ffn="mlp", activation="gelu", bias=True))
    with pytest.raises(ConfigError, match=r"^gguf export: pos='learned' is not a Llama-architecture model "
                                          r"\(needs pos='rope'\)$"):
        export_gguf(m, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def _cli(argv):
    from lmstack.compress.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exports_the_real_stories_model_quantized(shared_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    src = shared_data / "models" / "stories260K"
    if not src.is_dir():
        pytest.skip("stories260K is absent")
    assert _cli(["compress", "quantize", str(src), "--method", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert _cli(["compress", "gguf", str(tmp_path / "q8"), "--out", str(tmp_path / "q8" / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "F32" in out      # stories260K's FFN is 172 wide: its down projections stay F32
    from lmstack.infer.text import load_run

    ours, tok = load_run(tmp_path / "q8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q8", gguf_file="m.gguf").eval()
    x = torch.tensor([tok.encode("Once upon a time, there was a little girl")])
    with torch.no_grad():
        a, b = ours(x).float(), hf(x).logits.float()
    # the only difference: our per-row fp32 scales rounded to fp16 (relative 2^-11)
    assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(ConfigError, match=r"already exists; pass --force"):
        _cli(["compress", "gguf", str(tmp_path / "q8"), "--out", str(tmp_path / "q8" / "m.gguf")])
