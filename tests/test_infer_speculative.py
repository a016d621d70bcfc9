"""Speculative decoding: greedy output identical to the target alone; sampling keeps the target's
distribution (chi-square tests, which a deliberately wrong accept rule fails)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmstack.infer import GenerationConfig, generate, generate_result, stream
from lmstack.infer import speculative as spec
from lmstack.infer.speculative import accept_greedy, accept_sampled, prompt_lookup
from lmstack.infer.sampling import sample
from test_infer import PROMPTS, tiny

def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells expected < min_expected are pooled. Upper tail via the
    Wilson-Hilferty normal approximation (accurate to ~1e-3 for df >= 3, plenty for these thresholds)."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / (2 / (9 * df)) ** 0.5
    return float(0.5 * torch.erfc(torch.tensor(z / 2 ** 0.5, dtype=torch.float64)))


def wrong_accept(p, q, draft, generator=None):
    """A classic bug: on rejection, draw the replacement from p instead of the residual max(0, p - q)."""
    b, k = draft.shape
    p_d = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_d = q.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.rand(b, k, generator=generator)
    n = spec.leading_accepts(u * q_d < p_d)
    p_n = p.gather(1, n[:, None, None].expand(b, 1, p.shape[-1])).squeeze(1)
    return n, sample(p_n, generator)


def _random_dists(gen, n, vocab, sharp=2.5):
    return (torch.randn(n, vocab, generator=gen) * sharp).softmax(-1)


@pytest.mark.parametrize("rule, should_pass", [(accept_sampled, True), (wrong_accept, False)])
def test_accept_rule_emits_target_distribution_vectorised(rule, should_pass):
    gen = torch.Generator().manual_seed(0)
    vocab, k, draws = 6, 3, 60_000
    p = _random_dists(gen, k + 1, vocab)                       # target per position (context-free here)
    q = _random_dists(gen, k, vocab)                           # a poor draft: much mass where p has little
    draft = torch.stack([torch.multinomial(q[j], draws, replacement=True, generator=gen) for j in range(k)], 1)
    n, nxt = rule(p.expand(draws, -1, -1), q.expand(draws, -1, -1), draft, gen)
    first = torch.where(n >= 1, draft[:, 0], nxt)              # the first emitted token must be ~ p_1
    second = torch.where(n >= 2, draft[:, 1], nxt)[n >= 1]     # given the first was accepted: ~ p_2
    pvals = [chi_square_pvalue(torch.bincount(first, minlength=vocab).float(), p[0]),
             chi_square_pvalue(torch.bincount(second, minlength=vocab).float(), p[1])]
    if should_pass:
        assert min(pvals) > 1e-3, pvals
        assert 0 < (n == k).float().mean() < 1                  # the bonus and the rejection paths both ran
    else:
        assert min(pvals) < 1e-6, pvals


def _exact_joint(model, prompt, vocab, steps):
    """p(t1..t_steps | prompt) for every sequence, by enumeration with full forwards."""
    probs = torch.zeros([vocab] * steps)
    for seq in itertools.product(range(vocab), repeat=steps - 1):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids)[0, len(prompt) - 1:].float()       # (steps, V)
        lp = logits.log_softmax(-1)
        prefix = sum(float(lp[i, t]) for i, t in enumerate(seq))
        probs[seq] = (prefix + lp[steps - 1]).exp()
    return probs.flatten()


@pytest.mark.parametrize("rule, should_pass", [(None, True), (wrong_accept, False)])
def test_speculative_sampling_end_to_end_keeps_the_target_distribution(monkeypatch, rule, should_pass):
    vocab = 5
    target = tiny("rope", seed=1, vocab=vocab, scale=4.0)
    draft = tiny("rope", seed=2, vocab=vocab, scale=4.0, n_layer=1)
    if rule is not None:
        monkeypatch.setattr(spec, "accept_sampled", rule)
    prompt, steps = [1, 2, 3], 3
    exact = _exact_joint(target, prompt, vocab, steps)
    cfg = GenerationConfig(max_new_tokens=steps, do_sample=True, num_assistant_tokens=2, seed=0)
    batch = 8                                                   # rows accept different counts: the min rule
    rows = [generate(target, [prompt] * batch, cfg.replace(seed=s), draft_model=draft)[:, -steps:]
            for s in range(500)]
    samples = torch.cat(rows)
    index = (samples * torch.tensor([vocab ** 2, vocab, 1])).sum(1)
    p = chi_square_pvalue(torch.bincount(index, minlength=vocab ** steps).float(), exact)
    assert (p > 1e-3) if should_pass else (p < 1e-6), p


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_the_target_alone(k):
    target = tiny("rope", seed=1)
    draft = tiny("rope", seed=1, n_layer=1)                     # shares the first layer's weights: some agreement
    plain = generate_result(target, PROMPTS, GenerationConfig(max_new_tokens=20))
    eos = plain.new_tokens(1)[5]
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=eos, num_assistant_tokens=k)
    want = generate(target, PROMPTS, cfg.replace(num_assistant_tokens=4))
    res = generate_result(target, PROMPTS, cfg, draft_model=draft)
    assert torch.equal(res.sequences, want)
    assert 0 <= res.stats["acceptance"] <= 1 and res.stats["rounds"] > 0
    assert res.stats["target_forwards"] < 1 + 20                # some rounds kept more than one token


def test_greedy_prompt_lookup_equals_plain_greedy_and_accepts_on_repetitive_text():
    target = tiny("rope", seed=3)
    prompts = [[7, 8, 9, 10, 7, 8, 9, 10, 7, 8], [11, 12, 13]]
    cfg = GenerationConfig(max_new_tokens=24)
    want = generate(target, prompts, cfg)
    res = generate_result(target, prompts, cfg.replace(prompt_lookup_num_tokens=3))
    assert torch.equal(res.sequences, want)
    assert res.stats["proposed"] > 0


def test_streaming_speculative_yields_chunks_that_add_up():
    target, draft = tiny("rope", seed=1), tiny("rope", seed=1, n_layer=1)
    cfg = GenerationConfig(max_new_tokens=15, num_assistant_tokens=3)
    chunks = list(stream(target, [PROMPTS[0]], cfg, draft_model=draft))
    flat = [t for c in chunks for t in c[0]]
    assert flat == generate_result(target, [PROMPTS[0]], cfg).new_tokens(0)
    assert len(chunks) <= 15


def test_accept_helpers_and_prompt_lookup():
    n, nxt = accept_greedy(torch.tensor([[4, 5, 6, 7]]), torch.tensor([[4, 5, 9]]))
    assert n.tolist() == [2] and nxt.tolist() == [6]
    n, nxt = accept_greedy(torch.tensor([[4, 5, 6, 7]]), torch.tensor([[4, 5, 6]]))
    assert n.tolist() == [3] and nxt.tolist() == [7]             # all accepted: the bonus token
    row = torch.tensor([0, 0, 1, 2, 3, 4, 1, 2])
    assert prompt_lookup(row, 2, 3, start=2).tolist() == [3, 4]
    assert prompt_lookup(torch.tensor([1, 2, 3]), 2, 3).tolist() == []


def test_draft_with_another_vocabulary_is_refused():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="vocabulary"):
        generate(tiny("rope"), [[1, 2]], GenerationConfig(max_new_tokens=3), draft_model=tiny("rope", vocab=17))
