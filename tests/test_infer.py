"""The engine against its references: KV cache vs recomputation, batched vs one at a time (naive), stop
handling, processors, seeded sampling, sliding window, and the errors bad input gets."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer import GenerationConfig, generate, generate_result, stream
from lmstack.infer.naive import naive_generate
from lmstack.infer.sampling import (FrequencyPresencePenalty, min_p_filter, repetition_penalty, seen_mask,
                                    top_k_filter, top_p_filter)
from lmstack.model import KVCache, build_model, preset

V = 61


def tiny(pos: str = "rope", seed: int = 0, scale: float = 5.0, vocab: int = V, **kw):
    """A random model whose next-token distributions are peaked and depend on the context (plain random
    init is near-uniform and mostly repeats its input)."""
    torch.manual_seed(seed)
    kw = {"n_layer": 2, **kw}
    cfg = preset("tiny", vocab_size=vocab, d_model=48, n_head=4, n_kv_head=2, max_seq_len=48, pos=pos,
                 tie_embeddings=False, **kw)
    if pos == "learned":
        cfg = cfg.replace(norm="layernorm", ffn="mlp", activation="gelu_tanh", bias=True, n_kv_head=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
        model.lm_head.weight.mul_(3)
    return model


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    return tiny(request.param)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_kv_cache_decode_gives_the_logits_of_full_recomputation(model):
    cfg = GenerationConfig(max_new_tokens=12, top_logprobs=V, output_logprobs=True)
    for prompts in (PROMPTS, PROMPTS[:1]):                           # ragged batch and single
        cached = generate_result(model, prompts, cfg)
        full = generate_result(model, prompts, cfg.replace(use_cache=False))
        assert torch.equal(cached.sequences, full.sequences)
        vals_c, ids_c = cached.top_logprobs
        vals_f, ids_f = full.top_logprobs
        lp_c = torch.full((len(prompts), 12, V), 0.0).scatter(2, ids_c, vals_c)   # whole distribution per step
        lp_f = torch.full((len(prompts), 12, V), 0.0).scatter(2, ids_f, vals_f)
        assert (lp_c - lp_f).abs().max() < 1e-4
        assert torch.allclose(cached.logprobs, full.logprobs, atol=1e-4)


def test_batched_ragged_greedy_equals_each_prompt_alone(model):
    alone = [naive_generate(model, p, GenerationConfig(max_new_tokens=10)) for p in PROMPTS]
    eos = alone[0][3]                                                # stops row 0 early, the others maybe not
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    res = generate_result(model, PROMPTS, cfg)
    for row, p in enumerate(PROMPTS):
        want = naive_generate(model, p, cfg)
        assert res.new_tokens(row) == want
        assert res.finish_reasons[row] == ("stop" if want[-1] == eos else "length")
        assert res.sequences[row, res.prompt_len + len(want):].eq(0).all()          # padded after the stop
    assert res.num_generated[0] <= 4


def test_tensor_input_with_mask_equals_ragged_lists(model):
    ids = torch.tensor([[0, 0, 12, 13], [14, 15, 16, 17]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    cfg = GenerationConfig(max_new_tokens=6)
    assert torch.equal(generate(model, ids, cfg, attention_mask=mask), generate(model, [[12, 13], [14, 15, 16, 17]], cfg))
    assert torch.equal(generate(model, [12, 13], cfg), generate(model, torch.tensor([12, 13]), cfg))   # one flat prompt


def test_seeded_sampling_is_reproducible_and_matches_the_naive_reference(model):
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, PROMPTS, cfg.replace(seed=8)))
    # one prompt, no cache: bit-identical logits, so the same generator state draws the same tokens
    got = generate_result(model, [PROMPTS[0]], cfg.replace(use_cache=False)).new_tokens(0)
    assert got == naive_generate(model, PROMPTS[0], cfg, torch.Generator().manual_seed(7))


def test_num_return_sequences_sampling_gives_distinct_rows_grouped_by_prompt(model):
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=0)
    out = generate(model, PROMPTS[:2], cfg)
    assert out.shape[0] == 6
    assert len({tuple(r) for r in out[:3, -8:].tolist()}) > 1
    assert out[3:, -10:-8].tolist() == [[12, 13]] * 3


def test_streaming_yields_the_same_tokens_as_generate(model):
    cfg = GenerationConfig(max_new_tokens=9, eos_token_id=[3, 4], pad_token_id=0)
    res = generate_result(model, PROMPTS, cfg)
    got = [[] for _ in PROMPTS]
    for lists in stream(model, PROMPTS, cfg):
        for row, new in enumerate(lists):
            got[row] += new
    assert got == [res.new_tokens(r) for r in range(len(PROMPTS))]
    assert not torch.is_inference_mode_enabled()                   # the mode does not leak between steps


class ByteTok:
    """Token i is the byte 'a' + i % 26: enough for stop strings."""

    special_tokens: dict[str, int] = {}

    def token_bytes(self, i: int) -> bytes:
        return bytes([97 + i % 26])


def test_stop_string_ends_the_row_at_the_token_completing_it(model):
    cfg = GenerationConfig(max_new_tokens=12)
    free = generate_result(model, [PROMPTS[0]], cfg).new_tokens(0)
    text = "".join(chr(97 + t % 26) for t in free)
    stop = text[4:6]
    first = text.find(stop) + len(stop)
    res = generate_result(model, [PROMPTS[0]], cfg.replace(stop_strings=[stop]), tokenizer=ByteTok())
    assert res.new_tokens(0) == free[:first] and res.finish_reasons == ["stop"]
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, [PROMPTS[0]], cfg.replace(stop_strings=[stop]))


def test_min_new_tokens_suppresses_eos(model):
    free = generate_result(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10)).new_tokens(0)
    eos = free[0]
    assert generate_result(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10, eos_token_id=eos)).num_generated == [1]
    res = generate_result(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=10, eos_token_id=eos, min_new_tokens=3))
    assert res.num_generated[0] >= 3 and eos not in res.new_tokens(0)[:2]


def test_kv_cache_rewind_reorder_shift():
    cache = KVCache(n_layer=1, batch_size=2, n_kv_head=1, max_len=6, head_dim=2)
    k = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 1, 4, 2)
    cache.update(0, k, -k)
    cache.advance(4)
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0][0, :, :4], k[1]) and torch.equal(cache.v[0][1, :, :4], -k[1])
    cache.shift(1)
    assert cache.pos == 3 and torch.equal(cache.k[0][0, :, :3], k[1, :, 1:])
    cache.rewind(1)
    assert cache.pos == 1
    with pytest.raises(ValueError):
        cache.rewind(2)


def test_sliding_window_is_exact_inside_the_window_and_runs_past_the_context():
    model = tiny("rope")
    cfg = GenerationConfig(max_new_tokens=10)
    plain = generate(model, PROMPTS, cfg)
    assert torch.equal(generate(model, PROMPTS, cfg.replace(sliding_window=32)), plain)
    res = generate_result(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=80, sliding_window=16))
    assert res.num_generated == [80]                               # past max_seq_len=48, cache of 16 slots
    capped = generate_result(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=80))
    assert capped.num_generated == [48 - 7] and capped.stats["context_capped"]
    with pytest.raises(ConfigError, match="learned"):
        generate(tiny("learned"), [PROMPTS[0]], GenerationConfig(sliding_window=16))


def test_processors_on_a_hand_made_example():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert top_k_filter(logits, 2).isinf().tolist() == [[False, True, True, True, False]]
    probs = logits.softmax(-1)[0]                               # 0.236 0.087 0.032 0.012 0.643
    assert top_p_filter(logits, 0.8).isinf().tolist() == [[False, True, True, True, False]]
    assert top_p_filter(logits, 0.9).isinf().tolist() == [[False, False, True, True, False]]
    assert min_p_filter(logits, 0.1).isinf().tolist() == [[False, False, True, True, False]]
    assert (probs[1] > 0.1 * probs[4]) and (probs[2] < 0.1 * probs[4])
    seen = seen_mask(torch.tensor([[0, 3, 3]]), 5)
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0, 3.0]]
    pen = FrequencyPresencePenalty(0.5, 1.0, prompt_len=1)(torch.tensor([[4, 3, 3, 0]]), logits)
    assert pen.tolist() == [[0.5, 1.0, 0.0, -3.0, 3.0]]          # token 4 only in the prompt: untouched


def test_model_mode_is_restored(model):
    model.train()
    generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=2))
    assert model.training
    model.eval()


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fields, match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=2.0), "min_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_config_is_a_clear_config_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**fields)


def test_greedy_ignores_a_zero_temperature():
    assert GenerationConfig(temperature=0.0).do_sample is False


@pytest.mark.parametrize("prompt, match", [
    ([[]], "empty prompt"),
    ([[1, 2], []], "empty prompt"),
    (torch.zeros(1, 0, dtype=torch.long), "empty prompt"),
    ([list(range(1, 50))], "more than the model's context window of 48"),
    ([list(range(48))], "no room"),
    ([[1, V + 3]], "outside the model's vocabulary"),
    (torch.ones(2, 3), "integer token ids"),
    ([["a", "b"]], "integer token ids"),
])
def test_bad_prompts_raise_lmstack_error_before_the_model_runs(model, prompt, match):
    with pytest.raises(LmstackError, match=match):
        generate(model, prompt, GenerationConfig(max_new_tokens=4))


def test_right_padding_is_refused(model):
    with pytest.raises(LmstackError, match="left"):
        generate(model, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_config_round_trips_through_json(tmp_path):
    cfg = GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.8, eos_token_id=[2, 3], stop_strings=["\n\n"],
                           early_stopping="never", seed=3)
    cfg.save(tmp_path / "gen.json")
    assert GenerationConfig.load(tmp_path / "gen.json") == cfg
    assert GenerationConfig.load(tmp_path / "gen.json", ["--top_p", "0.5"]).top_p == 0.5
    with pytest.raises(ConfigError, match="top_pp"):
        GenerationConfig.from_dict({"top_pp": 0.5})


def test_int8_kv_cache_logits_stay_close_to_the_float_cache():
    from lmstack.model.cache import Int8KVCache, KVCache

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=97, d_model=64, n_head=4, n_kv_head=2, pos="rope",
                               norm="rmsnorm", ffn="swiglu", activation="silu", n_layer=2)).eval()
    ids = torch.randint(0, 97, (2, 24))
    caches = [KVCache.for_model(model, 2, 32), Int8KVCache.for_model(model, 2, 32)]
    outs = []
    with torch.no_grad():
        for cache in caches:
            steps = [model(ids[:, :16], kv_cache=cache)[:, -1]]
            steps += [model(ids[:, i:i + 1], kv_cache=cache)[:, -1] for i in range(16, 24)]
            outs.append(torch.stack(steps, 1))
    diff = (outs[0] - outs[1]).abs().max() / outs[0].abs().max()
    assert 0 < float(diff) < 0.02                     # quantized, and close
    assert caches[1].bytes < 0.4 * caches[0].bytes    # int8 codes + one fp32 scale per head and position
    cfg = GenerationConfig(max_new_tokens=12)
    a = generate(model, ids[:, :10], cfg)
    b = generate(model, ids[:, :10], cfg.replace(kv_cache_dtype="int8"))
    assert (a == b).float().mean() > 0.8              # greedy ids barely move
