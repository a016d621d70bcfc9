"""Parity of lmstack.infer with Hugging Face ``generate`` on random GPT-2, Llama and BART models of the same weights.

Greedy and beam search must give identical ids (and beam scores within 1e-5); sampling must see the
same filtered distribution at every step (probabilities within 1e-5, identical support).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.infer import GenerationConfig, generate, generate_result  # noqa: E402
from lmstack.infer.sampling import apply_processors, build_processors  # noqa: E402
from lmstack.model import hf  # noqa: E402

VOCAB = 101
PAD = 5


def _configs():
    t = transformers
    return {
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                              eos_token_id=2), t.GPT2LMHeadModel),
        "llama": (t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
                  t.LlamaForCausalLM),
    }


def _perturbed(model):
    """Random init leaves norms at 1 and biases at 0, and near-uniform outputs: perturb every weight and
    sharpen the embeddings so greedy and beam search face real choices."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
            if "wte" in name or "embed_tokens" in name or "lm_head" in name:
                p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    cfg, cls = _configs()[request.param]
    torch.manual_seed(0)
    ref = _perturbed(cls(cfg))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, hf.load(folder)


def _prompts():
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                        # ragged batch, left padding
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _an_eos(ref, ids, mask):
    """A token greedy decoding emits a few steps in, so that EOS stops some rows early."""
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    return int(out[0, ids.shape[1] + 3])


@torch.no_grad()
def test_greedy_ids_identical_to_hf(pair):
    ref, ours = pair
    ids, mask = _prompts()
    eos = _an_eos(ref, ids, mask)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                        pad_token_id=PAD)
    res = generate_result(ours, ids, GenerationConfig(max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD),
                          attention_mask=mask)
    assert torch.equal(res.sequences, want)
    assert res.finish_reasons[0] == "stop" and res.num_generated[0] <= 4 and res.new_tokens(0)[-1] == eos
    assert res.num_generated[0] < 20 and min(res.num_generated) < max(res.num_generated)   # rows stop on their own


@torch.no_grad()
def test_greedy_with_repetition_penalty_identical_to_hf(pair):
    ref, ours = pair
    ids, mask = _prompts()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                        pad_token_id=PAD, eos_token_id=None)
    got = generate(ours, ids, GenerationConfig(max_new_tokens=16, repetition_penalty=1.5, pad_token_id=PAD),
                   attention_mask=mask)
    assert torch.equal(got, want)


BEAM_CASES = [
    dict(num_beams=4),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.7),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    dict(num_beams=2, length_penalty=-0.5),
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@torch.no_grad()
def test_beam_search_ids_and_scores_identical_to_hf(pair, case):
    ref, ours = pair
    ids, mask = _prompts()
    eos = _an_eos(ref, ids, mask)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **case)
    res = generate_result(ours, ids, GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, **case),
                          attention_mask=mask)
    assert torch.equal(res.sequences, want.sequences)
    assert torch.allclose(res.scores, want.sequences_scores, atol=1e-5)


@pytest.mark.parametrize("fields", [dict(temperature=0.7, top_k=20, top_p=0.9),
                                    dict(temperature=1.3, top_p=0.5, min_p=0.05),
                                    dict(top_k=5, repetition_penalty=1.2)])
@torch.no_grad()
def test_sampling_filtered_distribution_matches_hf_each_step(pair, fields):
    ref, ours = pair
    ids, mask = _prompts()
    fields = {"top_k": 0, **fields}                         # HF's default top_k is 50, ours is off
    torch.manual_seed(3)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=PAD,
                        eos_token_id=None, output_scores=True, output_logits=True, return_dict_in_generate=True,
                        **fields)
    cfg = GenerationConfig(do_sample=True, **fields)
    t = ids.shape[1]
    procs = build_processors(cfg, t, (mask == 0).sum(1))
    for step, (hf_raw, hf_scores) in enumerate(zip(want.logits, want.scores)):
        prefix = want.sequences[:, :t + step]
        # the same raw logits through our chain: the same filtered distribution, exactly the same support
        ours_scores = apply_processors(procs, prefix, hf_raw.float())
        assert torch.equal(torch.isinf(ours_scores), torch.isinf(hf_scores)), f"support differs at step {step}"
        assert torch.allclose(ours_scores.softmax(-1), hf_scores.softmax(-1), atol=1e-6), step
        assert (~torch.isinf(ours_scores)).sum() < VOCAB * 3        # the filters did filter
        # and our model gives those raw logits on the sampled prefix (left padding, KV-free full forward)
        full_mask = torch.cat([mask, torch.ones(3, step, dtype=mask.dtype)], 1)
        assert torch.allclose(ours(prefix, attention_mask=full_mask)[:, -1], hf_raw, atol=1e-4), step


@torch.no_grad()
def test_bart_greedy_and_beam_identical_to_hf(tmp_path):
    t = transformers
    cfg = t.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                       forced_eos_token_id=None, forced_bos_token_id=None)
    torch.manual_seed(0)
    ref = _perturbed(t.BartForConditionalGeneration(cfg))
    ref.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    src = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    src_mask = torch.ones_like(src)
    src_mask[1, :4] = 0
    for case in (dict(), dict(num_beams=3, num_return_sequences=2)):
        want = ref.generate(src, attention_mask=src_mask, max_new_tokens=10, do_sample=False, eos_token_id=2,
                            pad_token_id=PAD, decoder_start_token_id=2, no_repeat_ngram_size=0, min_length=0,
                            forced_bos_token_id=None, forced_eos_token_id=None, **case)
        got = generate(ours, src, GenerationConfig(max_new_tokens=10, eos_token_id=2, pad_token_id=PAD,
                                                   decoder_start_token_id=2, **case), attention_mask=src_mask)
        assert torch.equal(got, want), case


@torch.no_grad()
def test_sliding_window_matches_hf_mistral_past_the_window(tmp_path):
    """Mistral's sliding-window attention: our cache keeps the last W positions; HF masks a band. Same ids,
    30 tokens past a window of 8, and different ids from the same weights without a window."""
    t = transformers

    def mistral(window):
        cfg = t.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              sliding_window=window, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=False)
        torch.manual_seed(0)
        m = t.MistralForCausalLM(cfg).eval()
        for p in m.parameters():                            # contextual outputs, so the window matters
            p.add_(torch.randn_like(p) * 0.02)
            if p.dim() == 2:
                p.mul_(4)
        return m

    ref = mistral(8)
    ref.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(ids, **kw)
    assert not torch.equal(want, mistral(None).generate(ids, **kw))
    assert torch.equal(generate(ours, ids, GenerationConfig(max_new_tokens=30, sliding_window=8)), want)
