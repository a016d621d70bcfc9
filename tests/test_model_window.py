"""Sliding-window (local) attention: parity with HF Mistral and Qwen2 (full forward and cached decode), the
HF config round trip, the encoder's banded mask, the validation errors and the mask-sharing contract."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.model import KVCache, ModelConfig, build_model, preset
from lmstack.model.layers import build_mask

ATOL = 1e-5
VOCAB = 97
T = 32
WINDOW = 8


def _perturb(model):
    torch.manual_seed(0)
    with torch.no_grad():                  # random init leaves norms at 1, biases at 0; big weights make
        for p in model.parameters():       # attention contextual, so the window changes the logits
            p.add_(torch.randn_like(p) * 0.02)
            if p.dim() == 2:
                p.mul_(3)
    return model


def _hf(name: str, window: int | None, impl: str, max_window_layers: int = 0):
    t = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if name == "mistral":
        cfg, cls = t.MistralConfig(**common, sliding_window=window), t.MistralForCausalLM
    else:
        cfg, cls = t.Qwen2Config(**common, use_sliding_window=window is not None, sliding_window=window,
                                 max_window_layers=max_window_layers), t.Qwen2ForCausalLM
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return _perturb(cls(cfg).eval())


def _ids(b: int = 2, t: int = T):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))


# (family, attn_implementation, qwen2 max_window_layers): Qwen2 with layer 0 full, layers 1-2 windowed
CASES = [("mistral", "sdpa", 0), ("mistral", "eager", 0), ("qwen2", "sdpa", 1), ("qwen2", "eager", 0)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-mwl{c[2]}")
def windowed_pair(request, tmp_path_factory):
    from lmstack.model import hf

    name, impl, mwl = request.param
    ref = _hf(name, WINDOW, impl, mwl)
    folder = tmp_path_factory.mktemp(f"{name}{impl}{mwl}")
    ref.save_pretrained(folder)
    ours = hf.load(folder)
    return name, impl, mwl, ref, ours, folder


@torch.no_grad()
def test_windowed_logits_match_hf_and_differ_from_full_attention(windowed_pair):
    name, impl, mwl, ref, ours, _ = windowed_pair
    assert ours.config.sliding_window == WINDOW and ours.config.max_window_layers == mwl
    assert ours.config.max_seq_len == 64                         # no longer capped to the window
    ids = _ids()
    want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= ATOL
    # the test can fail: HF really applies the window, and without it the logits move
    full = _hf(name, None, impl)(ids).logits
    assert (full - want).abs().max().item() > 1e-2
    assert (ours(ids[:, :WINDOW]) - full[:, :WINDOW]).abs().max().item() <= ATOL   # inside the window: equal


@torch.no_grad()
def test_windowed_cached_decode_token_by_token_matches_hf_full_prefix(windowed_pair):
    _, _, _, ref, ours, _ = windowed_pair
    ids = _ids()
    want = ref(ids).logits                                       # HF's full forward over the whole prefix
    cache = KVCache.for_model(ours, batch_size=2, max_len=T)
    steps = [ours(ids[:, :5], kv_cache=cache)] + [ours(ids[:, i:i + 1], kv_cache=cache) for i in range(5, 20)]
    steps.append(ours(ids[:, 20:T], kv_cache=cache))             # a many-token chunk over a cache past the window
    assert (torch.cat(steps, 1) - want).abs().max().item() <= ATOL


@torch.no_grad()
def test_windowed_export_reloads_in_hf_with_identical_logits(windowed_pair, tmp_path):
    import transformers

    from lmstack.model import hf

    name, _, mwl, ref, ours, _ = windowed_pair
    hf.save(ours, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == name and exported["sliding_window"] == WINDOW
    if name == "qwen2":
        assert exported["use_sliding_window"] and exported["max_window_layers"] == mwl
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    assert (again(ids).logits - ref(ids).logits).abs().max().item() <= ATOL
    assert hf.load(tmp_path / "out").config == ours.config


@torch.no_grad()
def test_padded_windowed_batch_equals_each_row_alone():
    model = build_model(preset("tiny", vocab_size=VOCAB, n_layer=2, n_kv_head=2, sliding_window=6)).eval()
    _perturb(model)
    ids = _ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                              # left padding
    got = model(ids, attention_mask=mask)
    alone = model(ids[1:, 7:])
    assert (got[1, 7:] - alone[0]).abs().max().item() <= ATOL
    cache = KVCache.for_model(model, 2, 20)                      # and decoding over the padded cache
    steps = [model(ids[:, :10], attention_mask=mask[:, :10], kv_cache=cache)]
    steps += [model(ids[:, i:i + 1], kv_cache=cache) for i in range(10, 20)]
    assert (torch.cat(steps, 1)[mask.bool()] - got[mask.bool()]).abs().max().item() <= ATOL


@torch.no_grad()
def test_static_step_applies_the_window():
    """The compiled decode path's static-shape step (tensors only) sees the same window as the dynamic one."""
    model = build_model(preset("tiny", vocab_size=VOCAB, n_layer=2, sliding_window=5)).eval()
    _perturb(model)
    ids = _ids(1, 16)
    want = model(ids)
    cache = KVCache.for_model(model, 1, 16)
    model(ids[:, :3], kv_cache=cache)
    for i in range(3, 16):
        cache.begin_static_step()
        got = model(ids[:, i:i + 1], kv_cache=cache)
        cache.end_static_step()
        assert (got[0, -1] - want[0, i]).abs().max().item() <= ATOL


def test_window_mask_is_built_once_per_forward_and_shared(monkeypatch):
    """One window mask object reaches every windowed layer; a window >= the sequence keeps the causal kernel."""
    import lmstack.model.layers as layers

    model = build_model(preset("tiny", vocab_size=VOCAB, n_layer=3, sliding_window=4, max_window_layers=1)).eval()
    seen = []
    real = layers.attention

    def spy(q, k, v, mask=None, is_causal=False, *args):
        seen.append((None if mask is None else id(mask), is_causal, k.shape[2]))
        return real(q, k, v, mask, is_causal, *args)

    monkeypatch.setattr(layers, "attention", spy)
    with torch.no_grad():
        model(_ids(1, 10))
    assert seen[0] == (None, True, 10)                           # layer 0: full attention, fast kernel
    assert seen[1][0] is not None and seen[1] == seen[2] and not seen[1][1]
    seen.clear()
    with torch.no_grad():
        model(_ids(1, 4))                                        # the window hides nothing: fast path everywhere
    assert seen == [(None, True, 4)] * 3
    seen.clear()
    cache = KVCache.for_model(model, 1, 12)
    with torch.no_grad():
        model(_ids(1, 10), kv_cache=cache)
        seen.clear()
        model(_ids(1, 1), kv_cache=cache)                        # decode: windowed layers read only 4 keys
    assert [s[2] for s in seen] == [11, 4, 4] and seen[1][0] is None


def test_encoder_band_mask_equals_a_hand_built_one():
    got = build_mask(None, 6, 6, False, torch.device("cpu"), window=2)[0, 0]
    want = torch.tensor([[abs(i - j) <= 2 for j in range(6)] for i in range(6)])
    assert torch.equal(got, want)
    causal = build_mask(None, 6, 6, True, torch.device("cpu"), window=2)[0, 0]
    assert torch.equal(causal, torch.tensor([[0 <= i - j < 2 for j in range(6)] for i in range(6)]))


@torch.no_grad()
def test_encoder_band_equals_full_attention_under_a_hand_built_mask(monkeypatch):
    import lmstack.model.layers as layers

    cfg = dict(arch="encoder", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, max_seq_len=32, pos="rope",
               norm="rmsnorm", ffn="swiglu", activation="silu", bias=False)
    banded = _perturb(build_model(ModelConfig(**cfg, sliding_window=2))).eval()
    full = build_model(ModelConfig(**cfg)).eval()
    full.load_state_dict(banded.state_dict())
    ids = _ids(1, 12)
    got = banded.encode(ids)
    unbanded = full.encode(ids)
    hand = torch.tensor([[abs(i - j) <= 2 for j in range(12)] for i in range(12)])
    real = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, mask=None, *a: real(q, k, v, hand, False))
    want = full.encode(ids)
    assert (got - want).abs().max().item() <= ATOL
    assert (got - unbanded).abs().max().item() > 1e-3               # the band matters


def test_window_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"'sliding_window': must be a positive integer"):
        preset("tiny", sliding_window=0)
    with pytest.raises(ConfigError, match=r"'sliding_window': is larger than the context max_seq_len=256.*lower it"):
        preset("tiny", sliding_window=257)
    with pytest.raises(ConfigError, match=r"'max_window_layers'"):
        preset("tiny", sliding_window=8, max_window_layers=-1)
    with pytest.raises(ConfigError, match=r"'sliding_window'.*encoder-decoder"):
        ModelConfig(arch="encoder-decoder", sliding_window=8)
    assert preset("tiny", sliding_window=256).sliding_window == 256     # = the context: allowed


def test_export_refuses_a_window_the_family_cannot_hold(tmp_path):
    from lmstack.model import hf

    with pytest.raises(ConfigError, match="'sliding_window'.*gpt2 has no sliding window"):
        hf.save(build_model(preset("gpt2-124m", n_layer=1, d_model=64, n_head=2, vocab_size=VOCAB,
                                   sliding_window=8)), tmp_path / "a")
    with pytest.raises(ConfigError, match="'max_window_layers'.*mistral"):
        hf.save(build_model(preset("tiny", n_layer=2, vocab_size=VOCAB, sliding_window=8, max_window_layers=1)),
                tmp_path / "b")


def test_hf_window_configs_load_as_transformers_applies_them():
    from lmstack.model.hf import config_from_hf

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=64, hidden_act="silu")
    q = dict(base, model_type="qwen2", sliding_window=8)
    assert config_from_hf(dict(q, use_sliding_window=False)).sliding_window is None
    got = config_from_hf(dict(q, use_sliding_window=True, max_window_layers=2))
    assert (got.sliding_window, got.max_window_layers) == (8, 2)
    assert config_from_hf(dict(q, use_sliding_window=True, max_window_layers=28)).sliding_window is None
    types = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    assert config_from_hf(dict(q, use_sliding_window=True, layer_types=types)).max_window_layers == 1
    with pytest.raises(ConfigError, match="'layer_types'"):
        config_from_hf(dict(q, use_sliding_window=True, layer_types=types[::-1]))
    m = dict(base, model_type="mistral")
    assert config_from_hf(dict(m, sliding_window=8)).sliding_window == 8
    assert config_from_hf(dict(m, sliding_window=4096)).sliding_window is None   # >= the context: full
    assert config_from_hf(dict(m, model_type="llama", sliding_window=8)).sliding_window is None


def test_cli_sets_the_window_and_a_too_large_one_exits_2(capsys):
    from lmstack.cli import main

    assert main(["model", "info", "tiny", "--sliding_window", "64", "--max_window_layers", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sliding_window"] == "64 (layers >= 2)"
    assert main(["model", "info", "tiny", "--sliding_window", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model config field 'sliding_window': is larger than the context max_seq_len=256, so it "
                   "would never apply: lower it or set it to null for full attention (got 1000)"]


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_cached_decode_equals_full_forward_and_the_reference_path(pos):
    cfg = preset("tiny", vocab_size=VOCAB, n_layer=2, n_kv_head=2, pos=pos, sliding_window=5, max_window_layers=1)
    model = _perturb(build_model(cfg)).eval()
    ids = _ids(2, 18)
    want = model(ids)
    ref = build_model(cfg.replace(attn_impl="reference")).eval()
    ref.load_state_dict(model.state_dict())
    assert (ref(ids) - want).abs().max().item() <= ATOL
    unwindowed = build_model(cfg.replace(sliding_window=None)).eval()
    unwindowed.load_state_dict(model.state_dict())
    assert (unwindowed(ids) - want).abs().max().item() > 1e-3
    cache = KVCache.for_model(model, 2, 18)
    steps = [model(ids[:, :3], kv_cache=cache)] + [model(ids[:, i:i + 1], kv_cache=cache) for i in range(3, 18)]
    assert (torch.cat(steps, 1) - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_blocked_window_attention_equals_the_dense_mask(pos, monkeypatch):
    """Long inputs attend in query blocks (skipping keys outside the window): same logits, same gradients,
    also for a chunk over a cache and with prefix-tuning keys, as the one dense window mask."""
    import lmstack.model.layers as layers

    cfg = preset("tiny", vocab_size=VOCAB, n_layer=2, n_kv_head=2, pos=pos, sliding_window=5, max_window_layers=1)
    model = _perturb(build_model(cfg))
    ids = _ids(2, 43)                                            # blocks of 5: the last one partial
    gen = torch.Generator().manual_seed(2)
    pk, pv = (torch.randn(2, 3, cfg.head_dim, generator=gen) for _ in range(2))
    model.blocks[1].attn.prefix_kv = lambda: (pk, pv)            # 3 prefix-tuning slots on a windowed layer

    def run(block):
        monkeypatch.setattr(layers, "WINDOW_BLOCK", block)
        model.zero_grad()
        logits, loss = model(ids, targets=ids)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            cache = KVCache.for_model(model, 2, 43)
            chunks = torch.cat([model(ids[:, :12], kv_cache=cache), model(ids[:, 12:], kv_cache=cache)], 1)
        return logits.detach(), grads, chunks

    calls = []
    real = layers.window_attention_blocks
    monkeypatch.setattr(layers, "window_attention_blocks", lambda *a: calls.append(1) or real(*a))
    dense, dense_grads, _ = run(10 ** 6)
    assert not calls
    blocked, blocked_grads, chunks = run(4)
    assert calls                                                  # the blocked path really ran
    assert (blocked - dense).abs().max().item() <= ATOL
    assert (chunks - dense).abs().max().item() <= ATOL
    assert max((a - b).abs().max().item() for a, b in zip(blocked_grads, dense_grads)) <= ATOL


@torch.no_grad()
def test_blocked_window_matches_hf_mistral_on_a_long_input(tmp_path):
    t = pytest.importorskip("transformers")
    from lmstack.model import hf

    cfg = t.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          sliding_window=16, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = _perturb(t.MistralForCausalLM(cfg).eval())
    ref.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    ids = _ids(1, 300)                                           # >= 2 blocks of 128: the blocked path
    assert (ours(ids) - ref(ids).logits).abs().max().item() <= ATOL
