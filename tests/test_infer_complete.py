"""complete(): the one text front-end. Its rules (empty-prompt fallback, left truncation that leaves room for
max_new_tokens, chat templates, stop ids and strings, finish reasons, padded vocabulary rows), and every
front-end (generate_text, stream_text, chat_stream, chat_reply, sample_text, LocalLLM) returning exactly what
complete() returns for the same input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from scripted import ScriptedModel

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer import GenerationConfig
from lmstack.infer.text import (Completion, chat_config, chat_stream, complete, complete_batch, fitting_budget,
                                generate_completions, generate_text, stream_complete, stream_text)
from lmstack.model import build_model, preset
from lmstack.tokenizer import train_bpe
from lmstack.tokenizer.chat import END_OF_TURN, render_chat

CORPUS = ["the cat sat on the mat. the dog sat on the log. once upon a time there was a cat.\n" * 4]
CTX = 64


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=300)


def _model(vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(preset("tiny", vocab_size=vocab, d_model=32, n_layer=2, n_head=4, max_seq_len=CTX,
                           tie_embeddings=False)).eval()
    with torch.no_grad():   # sharper logits: greedy text that varies with the prompt
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return m


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok.vocab_size)


class NoBos:
    """The tokenizer without a BOS id (and optionally without an EOS id)."""

    def __init__(self, tok, eos: bool = True):
        self._tok, self.bos_id = tok, None
        self.eos_id = tok.eos_id if eos else None

    def __getattr__(self, name):
        return getattr(self._tok, name)


# ---------------------------------------------------------------------------------------------------- rules


def test_empty_prompt_starts_from_bos_else_eos_else_is_refused(model, tok):
    cfg = GenerationConfig(max_new_tokens=6)
    c = complete(model, tok, "", cfg)
    assert c.prompt_tokens == 1 and c.truncated == 0
    assert c == complete(model, tok, [tok.bos_id], cfg)
    no_bos = NoBos(tok)
    assert complete(model, no_bos, "", cfg) == complete(model, tok, [tok.eos_id], cfg)
    with pytest.raises(LmstackError, match="empty prompt, and the tokenizer has no BOS or EOS"):
        complete(model, NoBos(tok, eos=False), "", cfg)


def test_truncation_keeps_the_most_recent_ids_and_leaves_room(model, tok):
    ids = tok.encode(CORPUS[0])
    assert len(ids) > CTX                                  # longer than the whole context
    cfg = GenerationConfig(max_new_tokens=10)
    c = complete(model, tok, CORPUS[0], cfg)
    keep = CTX - 10
    assert (c.prompt_tokens, c.truncated) == (keep, len(ids) - keep)
    assert c.prompt_tokens + cfg.max_new_tokens <= CTX
    assert c == dataclasses.replace(complete(model, tok, ids[-keep:], cfg), truncated=len(ids) - keep)
    assert c.finish_reason == "length" or c.token_ids[-1] == tok.eos_id
    short = complete(model, tok, "the cat", cfg)
    assert short.truncated == 0 and short.prompt_tokens == len(tok.encode("the cat"))
    with pytest.raises(ConfigError, match="'max_new_tokens': 64 leaves no room for a prompt in the model's context "
                                          "of 64 tokens"):
        complete(model, tok, "the", GenerationConfig(max_new_tokens=CTX))
    assert fitting_budget(model, 500) == CTX - 1 and fitting_budget(model, 8) == 8


def test_chat_messages_through_lmstack_template_and_an_hf_template(model, tok):
    pytest.importorskip("jinja2")
    from lmstack.tokenizer.template import ChatTemplate

    msgs = [{"role": "user", "content": "hi"}]
    words, after = tok.encode("the cat"), tok.encode(" sat")
    end, eos = tok.special_tokens[END_OF_TURN], tok.eos_id
    script = words + [end] + after + [eos]
    cfg = GenerationConfig(max_new_tokens=12)
    # lmstack's template: <|bos|><|user|>hi<|end|><|assistant|>, the reply ends at <|end|>
    ours = complete(ScriptedModel(model, script), tok, msgs, cfg)
    assert ours.prompt_tokens == len(render_chat(tok, msgs, add_generation_prompt=True)[0])
    assert (ours.text, ours.finish_reason, ours.n_tokens) == ("the cat", "stop", len(words) + 1)
    assert ours.token_ids == words + [end]
    # a Hugging Face template (no BOS, no <|end|>): rendered by the template, the reply ends at EOS only
    hf_tok = copy.copy(tok)
    hf_tok.chat_template = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
                                        {"eos_token": "<|eos|>"})
    rendered = hf_tok.chat_template.render(msgs, add_generation_prompt=True)
    assert rendered == "<|user|>hi\n<|assistant|>"
    theirs = complete(ScriptedModel(model, script), hf_tok, msgs, cfg)
    assert theirs.prompt_tokens == len(tok.encode(rendered, allowed_special="all")) != ours.prompt_tokens
    assert (theirs.text, theirs.finish_reason) == ("the cat sat", "stop")   # <|end|> is not printed, not a stop
    assert theirs.token_ids == script


def test_stop_string_cut_and_finish_reasons(model, tok):
    script = tok.encode(" cat sat on the mat")
    cfg = GenerationConfig(max_new_tokens=30, eos_token_id=[])            # no stop id: runs the whole budget
    full = complete(ScriptedModel(model, script), tok, "the", cfg)
    assert (full.finish_reason, full.n_tokens) == ("length", 30) and full.text.startswith(" cat sat on the mat")
    cut = complete(ScriptedModel(model, script), tok, "the", cfg.replace(stop_strings=["on t"]))
    assert cut.text == " cat sat "
    assert cut.finish_reason == "stop" and cut.n_tokens < 30
    assert "on t" in tok.decode(cut.token_ids)                             # the ids keep the stop string
    streamed = stream_complete(ScriptedModel(model, script), tok, "the", cfg.replace(stop_strings=["on t"]))
    assert "".join(streamed) == cut.text
    # a stop id: "stop", the stop token counted but not printed
    words = tok.encode(" cat sat")
    ended = complete(ScriptedModel(model, words + [tok.eos_id]), tok, "the", GenerationConfig(max_new_tokens=10))
    assert (ended.text, ended.finish_reason, ended.n_tokens) == (" cat sat", "stop", len(words) + 1)


def test_padded_vocabulary_rows_are_never_generated(tok):
    padded = _model(tok.vocab_size + 8)
    script = [tok.vocab_size + 3] * 5                                       # the model wants an undecodable id
    c = complete(ScriptedModel(padded, script), tok, "the cat", GenerationConfig(max_new_tokens=5, eos_token_id=[]))
    assert c.n_tokens == 5 and all(i < tok.vocab_size for i in c.token_ids)


def test_batches_are_one_kind_and_refuse_a_mix(model, tok):
    with pytest.raises(LmstackError, match="mixes chat messages and plain prompts"):
        complete_batch(model, tok, ["the", [{"role": "user", "content": "hi"}]])
    with pytest.raises(LmstackError, match="no prompts given"):
        complete_batch(model, tok, [])
    with pytest.raises(ConfigError, match="use complete_batch"):
        complete(model, tok, "the", GenerationConfig(do_sample=True, num_return_sequences=2))


# ---------------------------------------------------------------------------------------------------- front-ends

PROMPTS = ["the cat", "", "once upon a time there", CORPUS[0]]


def test_generate_text_and_streams_return_what_complete_returns(model, tok):
    cfg = GenerationConfig(max_new_tokens=12)
    singles = [complete(model, tok, p, cfg) for p in PROMPTS]
    assert [generate_text(model, tok, p, cfg) for p in PROMPTS] == [c.text for c in singles]
    assert ["".join(stream_text(model, tok, p, cfg)) for p in PROMPTS] == [c.text for c in singles]
    batch = complete_batch(model, tok, PROMPTS, cfg)
    assert generate_completions(model, tok, PROMPTS, cfg) == batch
    assert [c.text for c in batch] == [c.text for c in singles]          # left-padded batch == alone
    msgs = [{"role": "user", "content": "the cat"}]
    assert "".join(chat_stream(model, tok, msgs, cfg)) == complete(model, tok, msgs, cfg).text


def test_chat_reply_returns_what_complete_returns(model, tok):
    from lmstack.finetune.run import chat_reply

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": CORPUS[0]}]   # over-long
    for budget in (8, 500):
        expected = complete(model, tok, msgs, GenerationConfig(max_new_tokens=fitting_budget(model, budget)))
        assert chat_reply(model, tok, msgs, budget) == expected.text
    assert complete(model, tok, msgs, chat_config(tok, GenerationConfig(max_new_tokens=8))).truncated > 0


def test_sample_text_returns_what_complete_returns(model, tok):
    try:  # moving to lmstack.train.samples
        from lmstack.train.samples import sample_text
    except ImportError:
        from lmstack.train.trainer import sample_text

    for prompt, n in (("the cat", 10), ("", 5), (CORPUS[0], 100)):
        cfg = GenerationConfig(max_new_tokens=fitting_budget(model, n), do_sample=True, temperature=0.8, top_k=40,
                               seed=3)
        assert sample_text(model, tok, prompt, n, torch.device("cpu"), seed=3) == complete(model, tok, prompt, cfg).text


def test_local_llm_returns_what_complete_returns(model, tok):
    from lmstack.eval.llm import LocalLLM

    llm = LocalLLM(model, tok, batch_size=8)
    greedy = GenerationConfig(max_new_tokens=8, stop_strings=[" the"], top_logprobs=2, output_logprobs=True)
    done = complete_batch(model, tok, PROMPTS, greedy)
    got = llm.complete(PROMPTS, max_tokens=8, stop=[" the", ""], top_logprobs=2, n=2)
    for row, c in zip(got, done):
        assert [(x.text, x.finish_reason) for x in row] == [(c.text, c.finish_reason)] * 2
        assert row[0].top_logprobs == [{tok.decode([i]): v for i, v in pos} for pos in c.top_logprobs]
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.9, num_return_sequences=3, seed=1)
    expected = complete_batch(model, tok, PROMPTS[:2], sampled)
    got = llm.complete(PROMPTS[:2], max_tokens=6, temperature=0.9, n=3, seed=1)
    assert [[(x.text, x.finish_reason) for x in row] for row in got] == \
        [[(c.text, c.finish_reason) for c in expected[k * 3:(k + 1) * 3]] for k in range(2)]


def test_completion_counts_are_consistent(model, tok):
    c = complete(model, tok, "the cat", GenerationConfig(max_new_tokens=7))
    assert isinstance(c, Completion) and c.n_tokens == len(c.token_ids) <= 7
