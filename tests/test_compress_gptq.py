"""GPTQ: the blocked Cholesky implementation equals the paper's update written out, and beats rounding."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress.gptq import gptq_model, gptq_quantize, gptq_reference, input_hessians
from lmstack.compress.quantize import QuantConfig, QuantLinear


def _problem(out_f=12, in_f=64, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = torch.randn(n, in_f, generator=g) @ (torch.eye(in_f) + mix)   # correlated inputs, as real activations
    return w, x, 2 * x.t() @ x / n


@pytest.mark.parametrize("mode,symmetric", [("int4", True), ("int4", False), ("int8", True), ("nf4", True)])
def test_blocked_cholesky_gptq_equals_the_direct_update(mode, symmetric):
    w, _, h = _problem()
    gs = 32 if mode != "int8" else 64
    fast, _, _ = gptq_quantize(w, h, mode, gs, symmetric, act_order=False, block_size=16)
    ref = gptq_reference(w, h, mode, gs, symmetric)
    assert torch.equal(fast.double(), ref)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_layer_outputs_better_than_round_to_nearest(act_order):
    w, x, h = _problem(out_f=32, in_f=128, n=512, seed=1)
    lin = torch.nn.Linear(128, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    rtn = QuantLinear.from_linear(lin, "int4", 32)
    gptq = QuantLinear.from_linear(lin, "int4", 32, codes=gptq_quantize(w, h, "int4", 32, act_order=act_order))
    target = x @ w.t()
    err_rtn = (x @ rtn.dequantize().t() - target).pow(2).mean()
    err_gptq = (x @ gptq.dequantize().t() - target).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn
    assert torch.equal(gptq.scales, QuantLinear.from_linear(lin, "int4", 32).scales)  # same stored format


def test_gptq_model_calibrates_every_linear():
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=96, d_model=64, n_head=4, n_layer=2)).eval()
    batches = [torch.randint(0, 96, (2, 16)) for _ in range(4)]
    names = ["blocks.0.attn.qkv", "blocks.1.ffn.down"]
    hs = input_hessians(model, names, batches)
    d_ff = model.config.d_ff
    assert hs["blocks.1.ffn.down"].shape == (d_ff, d_ff)
    swapped = gptq_model(model, batches, QuantConfig("int4", 32))
    assert "lm_head" not in swapped and len(swapped) == 8
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)


def test_gptq_rejects_empty_calibration():
    from lmstack.errors import DataError
    from lmstack.model import build_model, preset

    with pytest.raises(DataError, match="calibration data is empty"):
        gptq_model(build_model(preset("tiny", vocab_size=96, d_model=64, n_head=4, n_layer=1)), [],
                   QuantConfig("int4", 32))
