"""AWQ: activation-aware scales never do worse than rounding on the calibration data, and beat it on outliers."""

from __future__ import annotations

import torch

from lmstack.compress.awq import awq_model, awq_search
from lmstack.compress.quantize import QuantConfig, QuantLinear


def test_awq_protects_channels_with_large_activations():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30                                   # a few outlier channels, as in real LLM activations
    s, alpha, err = awq_search(w, x.t() @ x / x.shape[0], x.abs().mean(0), "int4", 32)
    lin = torch.nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    rtn = QuantLinear.from_linear(lin, "int4", 32)
    err_rtn = float((x @ rtn.dequantize().t() - x @ w.t()).pow(2).sum(1).mean())   # the search's error: per token
    assert alpha > 0 and err < 0.8 * err_rtn
    assert s[:4].mean() > s[4:].mean()              # the outlier channels are scaled up before rounding


def test_awq_model_stores_the_input_scale_and_round_trips(tmp_path):
    from lmstack.compress import load_quantized, save_quantized
    from lmstack.infer import GenerationConfig, generate
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=96, d_model=64, n_head=4, n_layer=2)).eval()
    batches = [torch.randint(0, 96, (2, 16)) for _ in range(4)]
    swapped = awq_model(model, batches, QuantConfig("int4", 32), grid=5)
    assert all(spec["input_scale"] for spec in swapped.values())
    q = model.blocks[0].attn.qkv
    x = torch.randn(3, 64)
    with torch.no_grad():   # the kernel path scales the input as the reference weight does
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), q.bias), atol=2e-4, rtol=1e-4)
    save_quantized(model, tmp_path / "awq")
    back = load_quantized(tmp_path / "awq")
    prompt = torch.randint(0, 96, (1, 6))
    cfg = GenerationConfig(max_new_tokens=10)
    assert torch.equal(generate(model, prompt, cfg), generate(back, prompt, cfg))
