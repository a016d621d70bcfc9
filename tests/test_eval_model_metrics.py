"""Model-based metrics: perplexity / bits-per-byte / GPTScore vs direct computations; BERTScore vs bert-score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError
from lmstack.eval import compute_metric

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "all that glitters is not gold. the early bird catches the worm. ") * 4


@pytest.fixture(scope="module")
def tiny_lm():
    from lmstack.model import build_model, preset
    from lmstack.tokenizer import train_bpe

    tok = train_bpe([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=64))
    return model.eval(), tok


@torch.no_grad()
def direct_nll(model, ids: list[int]) -> float:
    """Sum of -log p(ids[t] | ids[<t]) for t >= 1 in one forward (no window)."""
    x = torch.tensor([ids])
    logp = F.log_softmax(model(x[:, :-1]).float(), -1)[0]
    return -float(logp.gather(-1, x[0, 1:, None]).sum().detach())


def test_perplexity_matches_direct_loss(tiny_lm):
    model, tok = tiny_lm
    texts = ["the quick brown fox", "all that glitters is not gold.", "a stitch"]
    res = compute_metric("perplexity", texts, model=model, tokenizer=tok, add_bos=True)
    nll, n = 0.0, 0
    for text, ppl in zip(texts, res.per_item):
        ids = [tok.bos_id] + tok.encode(text)
        with torch.no_grad():
            _, loss = model(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]]))
        assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
        nll += direct_nll(model, ids)
        n += len(ids) - 1
    assert res.score == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res.details["tokens"] == n
    bpb = compute_metric("bits_per_byte", texts, model=model, tokenizer=tok, add_bos=True)
    assert bpb.score == pytest.approx(nll / (math.log(2) * sum(len(t.encode()) for t in texts)), rel=1e-5)
    assert not res.higher_is_better
    # lmstack's own BPE does not put BOS first by default (its data has none): the first token is context only.
    plain = compute_metric("perplexity", texts, model=model, tokenizer=tok)
    assert tok.add_bos is False
    assert plain.details["tokens"] == n - len(texts)
    assert plain.per_item[0] == pytest.approx(math.exp(direct_nll(model, tok.encode(texts[0]))
                                                       / (len(tok.encode(texts[0])) - 1)), rel=1e-5)


@torch.no_grad()
def hf_recipe(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face sliding-window perplexity loop, written out plainly."""
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        logp = F.log_softmax(model(x[:, :-1]).float(), -1)[0]                 # predicts ids[begin+1:end]
        lp = logp.gather(-1, x[0, 1:, None])[:, 0]
        k = min(trg_len, len(lp))
        nll -= float(lp[-k:].sum())
        n += k
        prev_end = end
        if end == len(ids):
            break
    return nll, n


def test_sliding_window_matches_the_hf_recipe(tiny_lm):
    model, tok = tiny_lm
    ids_len = len(tok.encode(TEXT)) + 1
    assert ids_len > 64  # longer than the model context, so the window is needed
    res = compute_metric("perplexity", [TEXT], model=model, tokenizer=tok, max_length=32, stride=12, add_bos=True)
    nll, n = hf_recipe(model, [tok.bos_id] + tok.encode(TEXT), 32, 12)
    assert res.details["tokens"] == n == ids_len - 1
    assert res.score == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ConfigError, match="exceeds the model context"):
        compute_metric("perplexity", [TEXT], model=model, tokenizer=tok, max_length=128)


def test_gptscore_is_mean_token_logprob(tiny_lm):
    model, tok = tiny_lm
    res = compute_metric("gptscore", ["the lazy dog", "gold"], sources=["a fox", "glitters"], model=model,
                         tokenizer=tok, instruction="Summarise:")
    for pred, src, value in zip(["the lazy dog", "gold"], ["a fox", "glitters"], res.per_item):
        ctx = tok.encode(f"Summarise:\n{src}\n")
        whole = tok.encode(f"Summarise:\n{src}\n{pred}")
        assert whole[:len(ctx)] == ctx
        k = len(whole) - len(ctx)
        x = torch.tensor([whole])
        with torch.no_grad():
            logp = F.log_softmax(model(x[:, :-1]).float(), -1)[0].gather(-1, x[0, 1:, None])[:, 0]
        assert value == pytest.approx(float(logp[-k:].mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="needs model"):
        compute_metric("gptscore", ["x"], sources=["y"])


# ------------------------------------------------------------------------------------------------ BERTScore

def _bert_inputs(eval_data):
    base = eval_data / "eval" / "reference_tests" / "bert_score"
    read = lambda name: (base / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    extra_h = ["The cat sat on the mat.", "Completely unrelated words: banana, carburettor, 1987!"]
    extra_r = ["A cat was sitting on the mat.", "The weather today is sunny and warm."]
    return read("hyps.txt") + extra_h, read("refs.txt") + extra_r, read("refs2.txt") + extra_r[::-1]


@pytest.fixture(scope="module")
def minilm_path():
    from lmstack.eval.metrics.bertscore import default_encoder_path

    try:
        return str(default_encoder_path())
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("num_layers,idf", [(6, False), (6, True), (2, False)])
def test_bertscore_matches_bert_score(eval_data, minilm_path, num_layers, idf):
    bert_score = pytest.importorskip("bert_score")
    hyps, refs, _ = _bert_inputs(eval_data)
    ours = compute_metric("bertscore", hyps, refs, num_layers=num_layers, idf=idf)
    p, r, f = bert_score.score(hyps, refs, model_type=minilm_path, num_layers=num_layers, idf=idf)
    np.testing.assert_allclose(ours.per_item, f.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.details["per_item_precision"], p.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.details["per_item_recall"], r.numpy(), atol=1e-4)
    assert ours.score == pytest.approx(float(f.mean()), abs=1e-4)


def test_bertscore_multi_reference_and_rescaling(eval_data, minilm_path, tmp_path):
    bert_score = pytest.importorskip("bert_score")
    hyps, refs, refs2 = _bert_inputs(eval_data)
    multi = [[a, b] for a, b in zip(refs, refs2)]
    baseline = tmp_path / "baseline.tsv"
    rows = "".join(f"{layer},{0.2 + layer / 100},{0.22 + layer / 100},{0.21 + layer / 100}\n" for layer in range(7))
    baseline.write_text("LAYER,P,R,F\n" + rows, encoding="utf-8")  # bert-score's format: row i = layer i
    ours = compute_metric("bertscore", hyps, multi, rescale_with_baseline=True, baseline=str(baseline))
    scorer = bert_score.BERTScorer(model_type=minilm_path, num_layers=6, lang="en", rescale_with_baseline=True,
                                   baseline_path=str(baseline))
    p, r, f = scorer.score(hyps, multi)
    np.testing.assert_allclose(ours.per_item, f.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.details["per_item_recall"], r.numpy(), atol=1e-4)
    with pytest.raises(ConfigError, match="needs baseline"):
        compute_metric("bertscore", hyps[:2], refs[:2], rescale_with_baseline=True)


def test_bertscore_with_an_in_memory_model_and_empty_prediction(minilm_path):
    from lmstack.eval.metrics.bertscore import load_encoder

    model, tok = load_encoder(minilm_path)
    res = compute_metric("bertscore", ["", "a cat on a mat"], ["a dog", "the cat is on the mat"], model=model,
                         tokenizer=tok)
    assert res.failures == [{"index": 0, "reason": "empty prediction"}]
    assert res.per_item[0] == 0.0 and res.per_item[1] > 0.5
