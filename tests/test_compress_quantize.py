"""lmstack.compress.quantize: formats, fused kernels vs the dequantized reference, save/load round trips."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress import QuantConfig, QuantLinear, load_quantized, model_bytes, quantize_model, save_quantized
from lmstack.compress.quantize import quantize_weight
from lmstack.errors import ConfigError
from lmstack.model import build_model, preset


def _linear(i=256, o=96, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o, bias=bias)


@pytest.mark.parametrize("mode,symmetric,bound", [("int8", True, 1 / 254), ("int4", True, 1 / 14),
                                                  ("int4", False, 1 / 30), ("nf4", True, 0.17)])
def test_dequantized_weight_is_within_half_a_step(mode, symmetric, bound):
    lin = _linear()
    q = QuantLinear.from_linear(lin, mode, 32, symmetric)
    w = lin.weight.detach()
    g = w.view(w.shape[0], -1, 32) if mode != "int8" else w[:, None, :]
    span = g.abs().amax(-1, keepdim=True) if symmetric else (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True))
    err = (q.dequantize().view_as(g) - g).abs() / span
    assert float(err.max()) <= bound + 1e-6


@pytest.mark.parametrize("mode,symmetric,gs", [("int8", True, 0), ("int4", True, 32), ("int4", False, 64),
                                               ("int4", True, 128)])
def test_fused_kernel_equals_the_dequantized_reference(mode, symmetric, gs):
    lin = _linear(256, 64)
    q = QuantLinear.from_linear(lin, mode, gs or 32, symmetric)
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        assert q.kernel_available(x)
        fast = q(x)
        ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    assert fast.shape == (5, 3, 64)
    torch.testing.assert_close(fast, ref, atol=2e-4, rtol=1e-4)


def test_training_forward_uses_the_differentiable_path():
    q = QuantLinear.from_linear(_linear(64, 16), "int8")
    x = torch.randn(2, 64, requires_grad=True)
    assert not q.kernel_available(x)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(2, 64))
    assert not any(p.requires_grad for p in q.parameters())


def test_asymmetric_int4_hits_the_group_extremes_exactly():
    w = torch.linspace(-0.3, 0.9, 64).repeat(4, 1)
    codes, scale, mins = quantize_weight(w, "int4", 32, symmetric=False)
    assert codes.min() == 0 and codes.max() == 15
    deq = (codes.float().view(4, -1, 32) * scale + mins).view(4, 64)
    assert torch.allclose(deq[:, [0, 31, 32, 63]], w[:, [0, 31, 32, 63]], atol=1e-6)


def test_bad_inputs_name_the_field():
    with pytest.raises(ConfigError, match="group_size=48.*in_features \\(64\\) of 'blocks.0.attn.qkv'"):
        quantize_model(build_model(preset("tiny", vocab_size=64, d_model=64, n_head=4)),
                       QuantConfig("int4", group_size=48))
    with pytest.raises(ConfigError, match="no linear layers to quantize"):
        quantize_model(torch.nn.Sequential(torch.nn.Embedding(4, 4)))
    with pytest.raises(ConfigError, match="quantization method 'int3'"):
        QuantConfig("int3")


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_quantize_save_load_generate_round_trip(tmp_path, method):
    from lmstack.infer import GenerationConfig, generate

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=128, d_model=64, n_head=4, n_layer=2)).eval()
    fp32 = model_bytes(model)
    quantize_model(model, QuantConfig(method, group_size=32))
    assert model_bytes(model) < fp32 * (0.5 if method == "int8" else 0.4)
    save_quantized(model, tmp_path / "q", {"method": method})
    back = load_quantized(tmp_path / "q")
    prompt = torch.randint(0, 128, (2, 5))
    cfg = GenerationConfig(max_new_tokens=12)
    assert torch.equal(generate(model, prompt, cfg), generate(back, prompt, cfg))
    assert back.quantization["method"] == method


def test_an_edited_quantized_config_is_a_clear_error(tmp_path):
    import json

    model = build_model(preset("tiny", vocab_size=128, d_model=64, n_head=4, n_layer=2))
    quantize_model(model, QuantConfig("int8"))
    save_quantized(model, tmp_path / "q")
    cfg_path = tmp_path / "q" / "model_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_model"] = 96
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="does not match the stored weights"):
        load_quantized(tmp_path / "q")
    from lmstack.model import load

    with pytest.raises(ConfigError, match="a quantized model folder"):
        load(tmp_path / "q")


def test_w8a8_dynamic_activations_stay_close_and_round_trip(tmp_path):
    from lmstack.infer import GenerationConfig, generate

    lin = _linear(256, 64)
    q = QuantLinear.from_linear(lin, "int8", activations="int8")
    x = torch.randn(4, 256)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
        fast = q(x)
    assert float((fast - ref).abs().max() / ref.abs().max()) < 0.03   # the input is rounded to 8 bits too
    assert not torch.equal(fast, ref)                                 # ... so it is really the int8 GEMM
    with pytest.raises(ConfigError, match="W8A8"):
        QuantConfig("int4", activations="int8")
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=128, d_model=64, n_head=4, n_layer=2)).eval()
    quantize_model(model, QuantConfig("int8", activations="int8"))
    save_quantized(model, tmp_path / "w8a8")
    back = load_quantized(tmp_path / "w8a8")
    assert back.blocks[0].attn.qkv.activations == "int8"
    prompt = torch.randint(0, 128, (1, 5))
    cfg = GenerationConfig(max_new_tokens=8)
    assert torch.equal(generate(model, prompt, cfg), generate(back, prompt, cfg))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_inside_a_compiled_graph_reads_the_prepared_weight(monkeypatch, symmetric):
    """dynamo cannot trace data_ptr(): while compiling, the packed weight prepared beforehand is used as is
    (and packed in the graph when none was prepared); both give the eager kernel's output."""
    lin = _linear(256, 64)
    q = QuantLinear.from_linear(lin, "int4", 32, symmetric)
    x = torch.randn(3, 256)
    with torch.no_grad():
        eager = q(x)
        q._kernel_cache = None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        unprepared = q(x)
        assert q._kernel_cache is None                      # nothing stored from inside a graph
        monkeypatch.undo()
        q.prepare_kernels(torch.float32)
        cached = q._kernel_cache
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        prepared = q(x)
    assert q._kernel_cache is cached
    assert torch.equal(unprepared, eager) and torch.equal(prepared, eager)


@pytest.mark.slow
@pytest.mark.parametrize("qc", [QuantConfig("int4", 32), QuantConfig("int4", 32, symmetric=False),
                                QuantConfig("int8")], ids=["int4", "int4-asym", "int8"])
def test_quantized_decode_compiles_and_gives_the_eager_ids(qc):
    """The real torch.compile of the decode step of a quantized model (~15 s each): no fallback to eager."""
    import warnings

    import lmstack.infer.runner as runner
    from lmstack.infer import GenerationConfig, generate_result

    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128,
                           max_seq_len=256)).eval()
    quantize_model(m, qc)
    cfg = GenerationConfig(max_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)           # a fallback would hide a compile failure
        fast = generate_result(m, [[1, 2, 3, 4]], cfg.replace(compile=True)).sequences
    assert m not in runner._failed
    assert torch.equal(fast, generate_result(m, [[1, 2, 3, 4]], cfg).sequences)
