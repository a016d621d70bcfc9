"""LoRA: parity with peft, merge/unmerge, HF export of a merged model, several adapters, target errors.

Tolerances (fp32): our model vs peft on the same base and the same A/B, max abs logit difference <= 1e-4
(the model parity bar); merged vs unmerged <= 1e-5; a merged export loaded by transformers <= 1e-4.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmstack.errors import ConfigError, LmstackError  # noqa: E402
from lmstack.finetune.lora import (LoraConfig, LoRALinear, add_lora, adapter_state_dict, find_targets,  # noqa: E402
                                   load_adapter_state, merge_and_unload, merge_lora, set_adapter, unmerge_lora)
from lmstack.model import build_model, hf, preset  # noqa: E402

VOCAB = 97


def _ids():
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    ref = _perturb(transformers.LlamaForCausalLM(cfg).eval())
    folder = tmp_path_factory.mktemp("llama")
    ref.save_pretrained(folder)
    return cfg, folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    ref = _perturb(transformers.GPT2LMHeadModel(cfg).eval())
    folder = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(folder)
    return cfg, folder


LLAMA_MAP = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
             "gate_proj": "ffn.gate", "up_proj": "ffn.up", "down_proj": "ffn.down"}


def _copy_peft_llama(peft_model, ours):
    """Copy peft's A/B (``layers.i.self_attn.q_proj.lora_A.default.weight``) into our logical slices."""
    mods = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    n = 0
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        proj = next(k for k in LLAMA_MAP if f".{k}." in name)
        logical = LLAMA_MAP[proj]
        fused = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv", "ffn.gate": "ffn.gate_up",
                 "ffn.up": "ffn.gate_up"}.get(logical, logical)
        m = mods[f"blocks.{layer}.{fused}"]
        part = logical.split(".")[-1]
        which = m.lora_A if ".lora_A." in name else m.lora_B
        with torch.no_grad():
            which["default"][part].copy_(p)
        n += 1
    return n


def test_lora_matches_peft_llama_split_qkv(llama):
    cfg, folder = llama
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(3)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_MAP), lora_dropout=0.0,
                           init_lora_weights=False)     # random B too, so the adapter is not a no-op
    pm = peft.get_peft_model(ref, pcfg).eval()
    ours = hf.load(folder).eval()
    add_lora(ours, LoraConfig(r=4, alpha=8, targets=["attention", "mlp"]))
    assert _copy_peft_llama(pm, ours) == 2 * 7 * 2
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
        got = ours(ids)
        base = hf.load(folder).eval()(ids)
    assert (want - base).abs().max() > 1e-2            # the adapter changes the outputs...
    assert (got - want).abs().max() <= 1e-4            # ...and ours changes them exactly as peft does


def test_lora_matches_peft_gpt2_fused_qkv(gpt2):
    cfg, folder = gpt2
    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.manual_seed(4)
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                           init_lora_weights=False)
    pm = peft.get_peft_model(ref, pcfg).eval()
    ours = hf.load(folder).eval()
    targets = add_lora(ours, LoraConfig(r=4, alpha=16, targets=["qkv"]))
    assert targets == {f"blocks.{i}.attn.qkv": [f"blocks.{i}.attn.qkv"] for i in range(2)}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            layer = int(name.split(".h.")[1].split(".")[0])
            m = ours.get_submodule(f"blocks.{layer}.attn.qkv")
            with torch.no_grad():
                (m.lora_A if ".lora_A." in name else m.lora_B)["default"]["qkv"].copy_(p)
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - pm(ids).logits).abs().max() <= 1e-4


def _tiny():
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, max_seq_len=64)).eval()


def _randomise_lora(model, name="default", std=0.05):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{name}." in n:
                p.normal_(0, std)


def test_merge_unmerge_and_export_to_transformers(tmp_path):
    model = _tiny()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=["all-linear"]))
    _randomise_lora(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids)
        base_w = model.blocks[0].attn.qkv.base.weight.clone()
        merge_lora(model)
        merged = model(ids)
        assert not torch.equal(model.blocks[0].attn.qkv.base.weight, base_w)
        unmerge_lora(model)
        back = model(ids)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (back - unmerged).abs().max() <= 1e-5
    assert (model.blocks[0].attn.qkv.base.weight - base_w).abs().max() <= 1e-6
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    hf.save(plain, tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (ref(ids).logits - unmerged).abs().max() <= 1e-4


def test_several_adapters_switchable_and_saved(tmp_path):
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    add_lora(model, LoraConfig(r=2, targets=["q", "v"]), name="a")
    _randomise_lora(model, "a")
    add_lora(model, LoraConfig(r=4, targets=["down"]), name="b")
    _randomise_lora(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.b." in n or ".lora_B.b." in n for n in trainable)
    with torch.no_grad():
        out_b = model(ids)
        set_adapter(model, "a")
        out_a = model(ids)
        set_adapter(model, ["a", "b"])
        out_ab = model(ids)
        set_adapter(model, None)
        out_none = model(ids)
    assert torch.equal(out_none, base)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_ab, out_a)
    state = adapter_state_dict(model, "a")
    assert set(state) == {f"blocks.{i}.attn.qkv.lora_{x}.{p}" for i in range(2) for x in "AB" for p in "qv"}
    fresh = _tiny()
    add_lora(fresh, LoraConfig(r=2, targets=["q", "v"]), name="a")
    load_adapter_state(fresh, state, "a")
    with torch.no_grad():
        assert torch.equal(fresh(ids), out_a)
    with pytest.raises(LmstackError, match="no LoRA adapter named 'zzz'"):
        set_adapter(model, "zzz")


def test_target_patterns():
    model = _tiny()
    t = find_targets(model, [r"blocks\.0\.attn\.[qv]", "down"])
    assert t["blocks.0.attn.qkv"] == [(0, 64, "blocks.0.attn.q"), (128, 64, "blocks.0.attn.v")]
    assert set(t) == {"blocks.0.attn.qkv", "blocks.0.ffn.down", "blocks.1.ffn.down"}
    with pytest.raises(ConfigError, match=r"'q_proj'.*match no linear layer"):
        find_targets(model, ["q_proj", "o"])
