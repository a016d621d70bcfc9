"""Attention sinks (StreamingLLM) on the engine's sliding-window cache, and a windowed model's rolling cache."""

from __future__ import annotations

import pytest
import torch

import lmstack.infer.runner as runner
from lmstack.errors import ConfigError
from lmstack.infer import GenerationConfig, generate, generate_result
from lmstack.model import KVCache, build_model, preset
from lmstack.model.cache import Int8KVCache

V = 61


def tiny(n_layer: int = 2, **kw):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=V, d_model=48, n_head=4, n_kv_head=2, max_seq_len=48, n_layer=n_layer,
                 tie_embeddings=False, **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():                      # peaked, context-dependent next-token distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
        model.lm_head.weight.mul_(3)
    return model


def _caches(monkeypatch) -> list[KVCache]:
    made: list[KVCache] = []
    real = runner.make_kv_cache

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runner, "make_kv_cache", spy)
    return made


def test_sinks_stream_far_past_the_window_with_a_bounded_cache(monkeypatch):
    made = _caches(monkeypatch)
    prompt = [5, 6, 7, 8, 9, 10]
    res = generate_result(tiny(), [prompt], GenerationConfig(max_new_tokens=200, sliding_window=16,
                                                              attention_sinks=4))
    assert res.num_generated == [200]                              # past max_seq_len=48, 13x the window
    assert [c.max_len for c in made] == [16] and made[0].pos == 16
    assert made[0].bytes == 16 * tiny().kv_cache_bytes_per_token(torch.float32)


@torch.no_grad()
def test_sinks_greedy_equals_recomputing_over_sinks_plus_recent_tokens():
    """One layer: a cached key depends only on its token and position, so the streamed output must equal a
    fresh forward each step over the first 3 tokens + the last 9, at their absolute positions."""
    model = tiny(n_layer=1)
    prompt, window, sinks, n_new = [5, 6, 7, 8, 9], 12, 3, 40
    got = generate(model, [prompt], GenerationConfig(max_new_tokens=n_new, sliding_window=window,
                                                     attention_sinks=sinks))[0].tolist()
    toks = list(prompt)
    for _ in range(n_new):
        keep = list(range(len(toks))) if len(toks) <= window else \
            list(range(sinks)) + list(range(len(toks) - (window - sinks), len(toks)))
        ids = torch.tensor([[toks[i] for i in keep]])
        toks.append(int(model(ids, position_ids=torch.tensor([keep]))[0, -1].argmax()))
    assert got == toks
    plain = generate(model, [prompt], GenerationConfig(max_new_tokens=n_new, sliding_window=window))[0].tolist()
    assert plain != got                                            # the sinks change what the model sees


def test_zero_sinks_is_the_plain_sliding_window():
    model = tiny()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    cfg = GenerationConfig(max_new_tokens=60, sliding_window=10)
    assert torch.equal(generate(model, prompts, cfg.replace(attention_sinks=0)), generate(model, prompts, cfg))
    a, b = KVCache(1, 2, 1, 8, 2), KVCache(1, 2, 1, 8, 2)
    for c in (a, b):
        k = torch.arange(2 * 6 * 2, dtype=torch.float).view(2, 1, 6, 2)
        c.key_mask(torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]), 6)
        c.update(0, k, -k)
        c.advance(6)
    a.shift(3)
    b.shift(3, sinks=0)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors() + [a.mask], b.tensors() + [b.mask]))


@pytest.mark.parametrize("cls", [KVCache, Int8KVCache])
def test_eviction_keeps_each_rows_sinks_and_drops_its_padding_first(cls):
    cache = cls(1, 2, 1, 8, 1)
    k = torch.arange(1, 17, dtype=torch.float).view(2, 1, 8, 1)     # row 0: 1..8, row 1: 9..16
    cache.key_mask(torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]]), 8)
    cache.update(0, k, k)
    cache.advance(8)
    cache.shift(3, sinks=2)
    keys, _ = cache.update(0, torch.zeros(2, 1, 0, 1), torch.zeros(2, 1, 0, 1))   # read the 5 kept slots
    assert keys[:, 0, :, 0].round().tolist() == [[1, 2, 6, 7, 8], [12, 13, 14, 15, 16]]
    assert cache.mask[:, :5].tolist() == [[True] * 5, [True] * 5]
    cache.shift(2, sinks=2)                                          # row 1: its first real tokens are sinks now
    keys, _ = cache.update(0, torch.zeros(2, 1, 0, 1), torch.zeros(2, 1, 0, 1))
    assert keys[:, 0, :, 0].round().tolist() == [[1, 2, 8], [12, 13, 16]]
    with pytest.raises(ValueError, match="sink"):
        cache.shift(2, sinks=2)


def test_int8_cache_with_sinks_runs_past_the_window():
    res = generate_result(tiny(), [[5, 6, 7]], GenerationConfig(max_new_tokens=60, sliding_window=8,
                                                                 attention_sinks=2, kv_cache_dtype="int8"))
    assert res.num_generated == [60]


def test_windowed_model_with_a_cache_of_its_window_is_exact():
    """A model whose own window is W never looks further back: a W-slot rolling cache gives the same ids."""
    model = tiny(sliding_window=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    full = generate(model, prompts, GenerationConfig(max_new_tokens=35))
    assert torch.equal(generate(model, prompts, GenerationConfig(max_new_tokens=35, sliding_window=8)), full)
    unwindowed = tiny()
    assert not torch.equal(generate(unwindowed, prompts, GenerationConfig(max_new_tokens=35)), full)


def test_sink_validation_names_the_field():
    with pytest.raises(ConfigError, match="'attention_sinks': must be >= 0"):
        GenerationConfig(attention_sinks=-1)
    with pytest.raises(ConfigError, match="'attention_sinks': needs sliding_window"):
        GenerationConfig(attention_sinks=4)
    with pytest.raises(ConfigError, match="'attention_sinks': must be < sliding_window=4"):
        GenerationConfig(attention_sinks=4, sliding_window=4)
    with pytest.raises(ConfigError, match="'sliding_window': 16 exceeds the model's own sliding_window=8"):
        generate(tiny(sliding_window=8), [[5, 6]], GenerationConfig(sliding_window=16, attention_sinks=2))


def test_windowed_model_decodes_like_recomputation_in_every_loop():
    """Greedy, beam search and prompt-lookup speculative decoding (many-token verify forwards over the
    cache) of a windowed model give the ids of full recomputation, far past the window."""
    model = tiny(sliding_window=6)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [12, 13]]
    for cfg in (GenerationConfig(max_new_tokens=30), GenerationConfig(max_new_tokens=20, num_beams=3),
                GenerationConfig(max_new_tokens=30, prompt_lookup_num_tokens=3)):
        want = generate(model, prompts, cfg.replace(use_cache=False, prompt_lookup_num_tokens=None))
        assert torch.equal(generate(model, prompts, cfg), want), cfg


def test_windowed_model_static_decode_step_gives_the_same_ids(monkeypatch):
    """compile=True runs static-shape steps (here eagerly): the window comes from tensors, same ids."""
    monkeypatch.setattr(runner, "EAGER_ONLY", True)
    model = tiny(sliding_window=6)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    cfg = GenerationConfig(max_new_tokens=30)
    assert torch.equal(generate(model, prompts, cfg.replace(compile=True)), generate(model, prompts, cfg))


@pytest.mark.slow
def test_windowed_model_compiled_decode_gives_the_same_ids():
    import warnings

    model = tiny(sliding_window=6)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    cfg = GenerationConfig(max_new_tokens=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)             # a fallback would hide a compile failure
        got = generate(model, prompts, cfg.replace(compile=True))
    assert torch.equal(got, generate(model, prompts, cfg))
