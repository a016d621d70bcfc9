"""RoPE frequency scalings (llama3, yarn, dynamic NTK) against transformers: load, logits, KV-cache decode, export.

Tiny random HF models whose original context (32) is shorter than the test sequence (48), so both the
stretched and the kept frequency bands and the ramp between them are exercised.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.errors import ConfigError  # noqa: E402
from lmstack.model import KVCache, ModelConfig, hf  # noqa: E402
from lmstack.model.layers import rope_frequencies  # noqa: E402

ATOL = 1e-4
VOCAB = 101
SEQ = 48

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0}


def _cases():
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)                  # head_dim 32: 16 frequencies
    return {
        "llama3": (t.LlamaConfig(**common, rope_parameters=dict(LLAMA3), tie_word_embeddings=False),
                   t.LlamaForCausalLM),
        "yarn-qwen2": (t.Qwen2Config(**common, rope_parameters=dict(YARN), tie_word_embeddings=True),
                       t.Qwen2ForCausalLM),
        "yarn-llama-attn-factor": (t.LlamaConfig(**common, rope_parameters={**YARN, "attention_factor": 1.3,
                                                                            "beta_fast": 16.0}),
                                   t.LlamaForCausalLM),
    }


@pytest.fixture(scope="module", params=list(_cases()))
def pair(request, tmp_path_factory):
    cfg, cls = _cases()[request.param]
    torch.manual_seed(0)
    ref = cls(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, hf.load(folder)


def _ids():
    return torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_config_loaded_from_hf(pair):
    name, _, ours = pair
    cfg = ours.config
    assert cfg.rope_scaling == name.split("-")[0] and cfg.rope_original_max_len == 32
    if name == "llama3":
        assert (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (8.0, 1.0, 4.0)
    else:
        assert cfg.rope_scaling_factor == 4.0 and cfg.rope_beta_slow == 1.0
        assert cfg.rope_attn_factor == (1.3 if name.endswith("attn-factor") else None)


@torch.no_grad()
def test_inverse_frequencies_and_scaling_match_hf(pair):
    _, ref, ours = pair
    rotary = ref.model.rotary_emb
    inv_freq, scale = rope_frequencies(ours.config)
    assert (inv_freq - rotary.inv_freq).abs().max().item() <= 1e-7 * rotary.inv_freq.abs().max().item()
    assert scale == pytest.approx(rotary.attention_scaling, rel=1e-12)
    if ours.config.rope_scaling == "yarn":
        assert scale > 1.0
    base = 1.0 / 10000.0 ** (torch.arange(0, 32, 2).float() / 32)
    assert not torch.allclose(inv_freq, base) and torch.equal(inv_freq[0], base[0])   # scaled, fastest kept


@torch.no_grad()
def test_logits_and_kv_cache_decode_match_hf(pair):
    _, ref, ours = pair
    ids = _ids()
    want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= ATOL
    cache = KVCache.for_model(ours, batch_size=2, max_len=SEQ)
    steps = [ours(ids[:, :20], kv_cache=cache)] + [ours(ids[:, i:i + 1], kv_cache=cache) for i in range(20, SEQ)]
    assert (torch.cat(steps, 1) - want).abs().max().item() <= ATOL


@torch.no_grad()
def test_export_reloads_in_hf_with_identical_logits(pair, tmp_path):
    _, ref, ours = pair
    hf.save(ours, tmp_path / "out")
    rope = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == ours.config.rope_scaling
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    assert torch.equal(again(ids).logits, ref(ids).logits)
    assert hf.load(tmp_path / "out").config == ours.config


def test_legacy_rope_scaling_dict_and_yarn_defaults():
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=4096).to_dict()
    hf_cfg.pop("rope_parameters", None)
    hf_cfg.update(rope_theta=500000.0, rope_scaling={"type": "yarn", "factor": None,
                                                     "original_max_position_embeddings": 1024,
                                                     "mscale": 1.0, "mscale_all_dim": 0.5})
    cfg = hf.config_from_hf(hf_cfg)
    assert cfg.rope_scaling == "yarn" and cfg.rope_scaling_factor == 4.0          # max_pos / original
    assert cfg.rope_attn_factor == pytest.approx((0.1 * 1.3862943611 + 1) / (0.05 * 1.3862943611 + 1))
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_theta) == (32.0, 1.0, 500000.0)


def test_unsupported_rope_and_bad_fields_raise():
    hf_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2).to_dict()
    hf_cfg["rope_parameters"] = {"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="rope_parameters.rope_type.*only default, linear, dynamic"):
        hf.config_from_hf(hf_cfg)
    hf_cfg["rope_parameters"] = {**YARN, "truncate": False}
    with pytest.raises(ConfigError, match="truncate"):
        hf.config_from_hf(hf_cfg)
    with pytest.raises(ConfigError, match="rope_high_freq_factor"):
        ModelConfig(pos="rope", rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=4.0,
                    rope_high_freq_factor=1.0)
    with pytest.raises(ConfigError, match="rope_beta_fast"):
        ModelConfig(pos="rope", rope_scaling="yarn", rope_scaling_factor=4.0, rope_beta_fast=0.5)


# ---------------------------------------------------------------------------------------------------- dynamic NTK


@pytest.fixture(scope="module")
def dynamic_pair(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("dynamic")
    ref.save_pretrained(folder)
    return ref, hf.load(folder), folder


@torch.no_grad()
def test_dynamic_ntk_logits_and_cached_decode_match_hf(dynamic_pair):
    _, ours, folder = dynamic_pair
    cfg = ours.config
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len) == ("dynamic", 2.0, 32)
    assert torch.equal(rope_frequencies(cfg, seq_len=20)[0], rope_frequencies(cfg.replace(rope_scaling="none"))[0])
    ids = _ids()                                                    # 48 positions > 32
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()   # fresh rotary state
    want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= ATOL
    # step by step, each call's frequencies follow its own length and cached keys keep theirs, in both
    out = ref(ids[:, :20], use_cache=True)
    hf_steps, past = [out.logits], out.past_key_values
    for i in range(20, SEQ):
        out = ref(ids[:, i:i + 1], past_key_values=past, use_cache=True)
        hf_steps.append(out.logits)
        past = out.past_key_values
    cache = KVCache.for_model(ours, batch_size=2, max_len=SEQ)
    steps = [ours(ids[:, :20], kv_cache=cache)] + [ours(ids[:, i:i + 1], kv_cache=cache) for i in range(20, SEQ)]
    assert (torch.cat(steps, 1) - torch.cat(hf_steps, 1)).abs().max().item() <= ATOL
    assert (torch.cat(steps, 1) - want).abs().max().item() > ATOL   # ...so it is not the full forward


@torch.no_grad()
def test_dynamic_ntk_export_reloads_in_hf(dynamic_pair, tmp_path):
    _, ours, folder = dynamic_pair
    hf.save(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids()
    assert torch.equal(again(ids).logits, ref(ids).logits)
    assert hf.load(tmp_path / "out").config == ours.config
