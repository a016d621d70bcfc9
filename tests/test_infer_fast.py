"""The fast decode paths give the ids of the reference paths: the static-shape step (eagerly and through
torch.compile), the no-stop fast path of ``Session.append``, the int8 KV cache on the static step."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch

import lmstack.infer.runner as runner
from lmstack.errors import ConfigError
from lmstack.infer import GenerationConfig, generate_result, stream
from lmstack.infer.naive import naive_generate
from lmstack.model import KVCache, build_model, preset

V = 61
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def tiny(pos: str = "rope", seed: int = 0):
    """A random model with peaked, context-dependent next-token distributions (as tests/test_infer.py)."""
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=V, d_model=48, n_head=4, n_kv_head=2, n_layer=2, max_seq_len=48, pos=pos,
                 tie_embeddings=False)
    if pos == "learned":
        cfg = cfg.replace(norm="layernorm", ffn="mlp", activation="gelu_tanh", bias=True, n_kv_head=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
        model.lm_head.weight.mul_(3)
    return model


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):
    return tiny(request.param)


@pytest.fixture
def eager_static(monkeypatch):
    """compile=True runs the static-shape step eagerly (as after a failed compile), without compiling."""
    monkeypatch.setattr(runner, "EAGER_ONLY", True)


def test_static_step_logits_equal_the_dynamic_cache_step(model):
    torch.manual_seed(1)
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False                                              # row 1 is left-padded
    with torch.inference_mode():
        dyn, sta = KVCache.for_model(model, 2, 20), KVCache.for_model(model, 2, 20)
        model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=dyn)
        model(ids[:, :5], attention_mask=mask[:, :5], kv_cache=sta)
        for j in range(5, 9):
            want = model(ids[:, j:j + 1], kv_cache=dyn)
            sta.begin_static_step()
            got = model(ids[:, j:j + 1], kv_cache=sta)
            sta.end_static_step()
            assert sta.pos == dyn.pos == j + 1
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_static_step_gives_the_reference_ids_on_a_ragged_batch(model, eager_static):
    alone = [naive_generate(model, p, GenerationConfig(max_new_tokens=10)) for p in PROMPTS]
    eos = alone[0][3]                                                # row 0 stops early
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=0, compile=True)
    res = generate_result(model, PROMPTS, cfg)
    for row, p in enumerate(PROMPTS):
        want = naive_generate(model, p, cfg)
        assert res.new_tokens(row) == want
        assert res.finish_reasons[row] == ("stop" if want[-1] == eos else "length")
    assert res.num_generated[0] <= 4
    # the reused fixed-size cache gives the same ids again, and so does use_cache=False
    again = generate_result(model, PROMPTS, cfg)
    assert torch.equal(again.sequences, res.sequences)
    assert torch.equal(generate_result(model, PROMPTS, cfg.replace(compile=False, use_cache=False)).sequences,
                       res.sequences)


def test_no_stop_fast_path_equals_the_reference_and_streams(model):
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=[])        # nothing can stop a row
    res = generate_result(model, PROMPTS, cfg)
    assert res.num_generated == [8, 8, 8] and res.finish_reasons == ["length"] * 3
    for row, p in enumerate(PROMPTS):
        assert res.new_tokens(row) == naive_generate(model, p, cfg)
    steps = list(stream(model, PROMPTS, cfg))
    assert [[s[row][0] for s in steps] for row in range(3)] == [res.new_tokens(r) for r in range(3)]


def test_static_step_with_the_int8_kv_cache_gives_the_ids_of_the_dynamic_int8_cache(model, eager_static):
    cfg = GenerationConfig(max_new_tokens=12, kv_cache_dtype="int8", output_logprobs=True)
    dyn = generate_result(model, PROMPTS, cfg)
    sta = generate_result(model, PROMPTS, cfg.replace(compile=True))
    assert torch.equal(sta.sequences, dyn.sequences)
    assert torch.allclose(sta.logprobs, dyn.logprobs, atol=1e-4)


def test_static_step_sampling_with_a_seed_draws_the_same_ids(model, eager_static):
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=20, seed=3, repetition_penalty=1.3)
    assert torch.equal(generate_result(model, PROMPTS, cfg.replace(compile=True)).sequences,
                       generate_result(model, PROMPTS, cfg).sequences)


def test_compile_needs_the_kv_cache():
    with pytest.raises(ConfigError, match="generation config field 'compile': needs use_cache=true"):
        GenerationConfig(compile=True, use_cache=False)


def test_a_failing_compile_falls_back_to_the_eager_step_with_one_warning(model, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(runner, "_failed", weakref.WeakKeyDictionary())
    monkeypatch.setattr(runner, "_compiled", {})
    monkeypatch.setattr(runner, "_said", set())
    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = GenerationConfig(max_new_tokens=6, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = generate_result(model, PROMPTS, cfg)
        b = generate_result(model, PROMPTS, cfg)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert msgs == ["torch.compile is unavailable for the decode step (RuntimeError: no C++ compiler here); "
                    "decoding eagerly"]
    want = generate_result(model, PROMPTS, cfg.replace(compile=False)).sequences
    assert torch.equal(a.sequences, want) and torch.equal(b.sequences, want)


def test_compile_on_an_alibi_model_says_so_and_decodes_eagerly(monkeypatch):
    m = tiny("alibi")
    monkeypatch.setattr(runner, "_said", set())
    cfg = GenerationConfig(max_new_tokens=5, compile=True)
    with pytest.warns(RuntimeWarning, match=r"decode step \(not for ALiBi positions\); decoding eagerly"):
        res = generate_result(m, PROMPTS, cfg)
    assert torch.equal(res.sequences, generate_result(m, PROMPTS, cfg.replace(compile=False)).sequences)


@pytest.mark.slow
def test_compiled_step_gives_the_reference_ids():
    """The real torch.compile (about 15-30 s on 2 cores): same ids as the eager reference, ragged batch."""
    m = tiny("rope")
    cfg = GenerationConfig(max_new_tokens=10, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)           # a fallback would hide a compile failure
        res = generate_result(m, PROMPTS, cfg)
    for row, p in enumerate(PROMPTS):
        assert res.new_tokens(row) == naive_generate(m, p, cfg)
