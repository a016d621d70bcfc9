"""Parity with Hugging Face transformers: tiny random HF models saved, loaded into lmstack, compared, exported back.

Tolerance: max abs logit difference <= 1e-4 in fp32 (the issue's bar).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.errors import ConfigError  # noqa: E402
from lmstack.model import KVCache, build_model, hf, preset  # noqa: E402

ATOL = 1e-4
VOCAB = 101


def _decoder_configs():
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                              eos_token_id=2), t.GPT2LMHeadModel),
        "llama": (t.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False),
                  t.LlamaForCausalLM),
        "mistral": (t.MistralConfig(**common, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False),
                    t.MistralForCausalLM),
        "qwen2": (t.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True), t.Qwen2ForCausalLM),
    }


def _hf_model(cfg, cls):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    # random init leaves norms at 1 and biases at 0: perturb everything so every weight is tested
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module", params=list(_decoder_configs()))
def decoder_pair(request, tmp_path_factory):
    name = request.param
    cfg, cls = _decoder_configs()[name]
    ref = _hf_model(cfg, cls)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    return name, ref, hf.load(folder), folder


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=gen)


@torch.no_grad()
def test_decoder_logits_match_hf(decoder_pair):
    _, ref, ours, _ = decoder_pair
    ids = _batch()
    diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= ATOL, diff


@torch.no_grad()
def test_decoder_padded_batch_matches_hf(decoder_pair):
    _, ref, ours, _ = decoder_pair
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                                # left padding
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                       # HF needs explicit positions for left padding
    want = ref(ids, attention_mask=mask, position_ids=pos).logits
    got = ours(ids, attention_mask=mask)                           # ours derives them from the mask
    real = mask.bool()
    diff = (got[real] - want[real]).abs().max().item()
    assert diff <= ATOL, diff


@torch.no_grad()
def test_decoder_kv_cache_decode_matches_hf_full_forward(decoder_pair):
    _, ref, ours, _ = decoder_pair
    ids = _batch()
    want = ref(ids).logits
    cache = KVCache.for_model(ours, batch_size=2, max_len=16)
    steps = [ours(ids[:, :7], kv_cache=cache)] + [ours(ids[:, i:i + 1], kv_cache=cache) for i in range(7, 12)]
    diff = (torch.cat(steps, 1) - want).abs().max().item()
    assert diff <= ATOL, diff


@torch.no_grad()
def test_decoder_export_reloads_in_hf_with_identical_logits(decoder_pair, tmp_path):
    name, ref, ours, _ = decoder_pair
    hf.save(ours, tmp_path / "out")
    family = json.loads((tmp_path / "out" / "config.json").read_text())["model_type"]
    assert family == {"mistral": "llama"}.get(name, name)          # Mistral without a window is a Llama
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _batch()
    assert torch.equal(again(ids).logits, ref(ids).logits)
    assert again.num_parameters() == ours.num_parameters() == ref.num_parameters()


# ---------------------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    ref = _hf_model(cfg, transformers.BertForMaskedLM)
    folder = tmp_path_factory.mktemp("bert")
    ref.save_pretrained(folder)
    return ref, hf.load(folder)


def _padded_pair():
    ids = _batch()
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0                                                # right padding
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids.masked_fill(mask == 0, 0), mask, types


@torch.no_grad()
def test_bert_mlm_logits_and_hidden_states_match_hf(bert_pair):
    ref, ours = bert_pair
    assert ours.config.arch == "encoder" and ours.config.mlm_head
    ids, mask, types = _padded_pair()
    out = ref(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    got = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (got[real] - out.logits[real]).abs().max().item() <= ATOL
    hidden = ours.encode(ids, attention_mask=mask, token_type_ids=types)
    assert (hidden[real] - out.hidden_states[-1][real]).abs().max().item() <= ATOL


@torch.no_grad()
def test_bert_export_reloads_in_hf(bert_pair, tmp_path):
    ref, ours = bert_pair
    hf.save(ours, tmp_path / "bert")
    again = transformers.BertForMaskedLM.from_pretrained(tmp_path / "bert").eval()
    ids, mask, types = _padded_pair()
    assert torch.equal(again(ids, attention_mask=mask, token_type_ids=types).logits,
                       ref(ids, attention_mask=mask, token_type_ids=types).logits)


@torch.no_grad()
def test_bert_cross_encoder_scores_match_hf(tmp_path):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=1)
    ref = _hf_model(cfg, transformers.BertForSequenceClassification)
    ref.save_pretrained(tmp_path / "ce")
    ours = hf.load(tmp_path / "ce")
    assert ours.config.n_labels == 1 and ours.config.pooler
    ids, mask, types = _padded_pair()
    want = ref(ids, attention_mask=mask, token_type_ids=types).logits
    assert (ours.classify(ids, mask, types) - want).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------------- BART


@pytest.fixture(scope="module")
def bart_pair(tmp_path_factory):
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                  decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=1)
    ref = _hf_model(cfg, transformers.BartForConditionalGeneration)
    with torch.no_grad():
        ref.final_logits_bias.add_(torch.randn_like(ref.final_logits_bias) * 0.1)
    folder = tmp_path_factory.mktemp("bart")
    ref.save_pretrained(folder)
    return ref, hf.load(folder)


def _seq2seq_batch():
    src = _batch()
    mask = torch.ones_like(src)
    mask[1, 9:] = 0
    src = src.masked_fill(mask == 0, 1)
    dec = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    return src, mask, dec


@torch.no_grad()
def test_bart_logits_and_cached_decode_match_hf(bart_pair):
    ref, ours = bart_pair
    assert ours.config.arch == "encoder-decoder"
    src, mask, dec = _seq2seq_batch()
    want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
    assert (ours(src, dec, attention_mask=mask) - want).abs().max().item() <= ATOL
    memory = ours.encode(src, mask)
    cache = KVCache.for_model(ours, batch_size=2, max_len=8)
    steps = [ours.decode(dec[:, :3], memory, mask, kv_cache=cache)]
    steps += [ours.decode(dec[:, i:i + 1], memory, mask, kv_cache=cache) for i in range(3, 7)]
    assert (torch.cat(steps, 1) - want).abs().max().item() <= ATOL


@torch.no_grad()
def test_bart_export_reloads_in_hf(bart_pair, tmp_path):
    ref, ours = bart_pair
    hf.save(ours, tmp_path / "bart")
    again = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "bart").eval()
    src, mask, dec = _seq2seq_batch()
    assert torch.equal(again(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits,
                       ref(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits)


# ---------------------------------------------------------------------------------------------------- errors


def test_unsupported_configs_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        hf.config_from_hf({"model_type": "t5"})
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2).to_dict()
    llama["rope_parameters"] = {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):
        hf.config_from_hf(llama)
    with pytest.raises(ConfigError, match="'pos'"):
        hf.save(build_model(preset("tiny", pos="alibi")), tmp_path / "x")
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        hf.load(tmp_path)
