"""Generated grounded answers (parse, verify, judge, abstain), judged RAGAS metrics, abstention P/R, the
"I don't know" data builder, the SQuAD article split and ``rag query --model`` (hand-built cases, fake judges)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from scripted import ScriptedModel

from lmstack.cli import main
from lmstack.eval.llm import Completion
from lmstack.rag.answer import (IDK, GenerateConfig, check_generated, generate_answer, generate_answers,
                                render_prompt, strip_citations)
from lmstack.rag.chunk import Chunk
from lmstack.rag.idk import IdkConfig, build_idk_examples, dpo_rows, score_answers, sft_rows
from lmstack.rag.index import Hit
from lmstack.rag.judged import answer_relevancy, context_precision, context_recall, faithfulness, statements
from lmstack.rag.metrics import abstention_precision_recall
from lmstack.rag.squad import read_squad, squad_article_split, squad_paragraphs


def _hit(cid: str, text: str, score: float = 5.0) -> Hit:
    return Hit(Chunk(f"{cid}#0", cid, f"{cid}.md", 0, len(text), text), score)


HITS = [_hit("cats", "Cats purr when they are happy. Cats eat fish."),
        _hit("dogs", "Dogs bark at the postman every morning.", 4.0)]


class FakeJudge:
    """A deterministic LLM for the evaluation layer's yes/no judge: "yes" when every word of the claim (the
    text after the last "Answer: " of the output, else the output) occurs in the input; "maybe" (a reply
    naming neither option) when the claim contains "???". Questions for answer relevancy come from ``questions``."""

    name = "fake"

    def __init__(self, questions: dict[str, list[str]] | None = None):
        self.questions = questions or {}
        self.prompts: list[str] = []

    def complete(self, prompts, *, max_tokens=256, temperature=0.0, n=1, stop=(), top_logprobs=0, seed=None):
        out = []
        for p in prompts:
            self.prompts.append(p)
            if p.startswith("Write one question"):
                answer = re.search(r"Answer: (.*)\n\nQuestion:", p).group(1)
                out.append([Completion(q) for q in self.questions[answer][:n]])
                continue
            source = p.split("\nInput:\n", 1)[1].split("\n\nOutput:\n", 1)[0].lower()
            output = p.split("\n\nOutput:\n", 1)[1].split("\n\nAnswer with exactly one of", 1)[0]
            claim = output.rsplit("Answer: ", 1)[-1].lower()
            words = re.findall(r"\w+", claim)
            reply = "maybe" if "???" in claim else "yes" if all(w in re.findall(r"\w+", source) for w in words) else "no"
            out.append([Completion(reply)] * n)
        return out


# ------------------------------------------------------------------------------------------ generated answers

def test_citations_parsed_and_each_sentence_verified_unsupported_dropped():
    a = check_generated("Cats purr when they are happy. [1] Dogs bark at cats. [2]", HITS)
    assert not a.abstained
    assert a.text == "Cats purr when they are happy. [1]"
    assert [(c.supported, c.method, c.score) for c in a.checks][0] == (True, "exact", 100.0)
    assert not a.checks[1].supported and a.checks[1].why.startswith("best match")
    assert [(s.n, s.doc_id, s.score) for s in a.sources] == [(1, "cats", 5.0)]
    assert a.reason == "1 of 2 sentence(s) supported (1 dropped)"
    flagged = check_generated("Cats purr when they are happy. [1] Dogs bark at cats. [2]", HITS,
                              GenerateConfig(unsupported="flag"))
    assert flagged.text == "Cats purr when they are happy. [1] Dogs bark at cats. [2]"
    assert [s.n for s in flagged.sources] == [1]  # a flagged sentence is shown but supports nothing


def test_the_judge_decides_what_the_span_match_cannot():
    text = "Every morning dogs bark at the postman. [2]"   # reordered: the span match scores 78 < 90
    assert check_generated(text, HITS).abstained
    judge = FakeJudge()
    a = check_generated(text, HITS, judge=judge)
    assert not a.abstained and a.checks[0].method == "judge" and a.checks[0].supported
    assert "Dogs bark at the postman every morning." in judge.prompts[0]   # the cited source is the input
    no = check_generated("Dogs bark at the mailman by night. [2]", HITS, judge=FakeJudge())
    assert no.abstained and no.text == IDK
    assert no.reason.startswith(f"{IDK}: no sentence of the reply is supported by its cited source")
    assert no.checks[0].why.endswith("the judge says no")


def test_model_abstention_and_retrieval_abstention():
    a = check_generated("I don't know.", HITS)
    assert a.abstained and a.reason == f"{IDK}: the model says the sources do not hold the answer"
    assert check_generated("", HITS).reason == f"{IDK}: the reply has no sentence"
    # below min_score: no model call at all (the model here would fail if it were called)
    [low, empty] = generate_answers(["why?", "why?"], [[_hit("x", "Text.", 0.5)], []], object(), object(),
                                    GenerateConfig(min_score=2.0))
    assert low.abstained and low.reason == f"{IDK}: the best retrieval score 0.5 is below min_score 2"
    assert empty.reason == f"{IDK}: nothing was retrieved"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    tok = train_bpe(["Cats purr when they are happy. Cats eat fish. Dogs bark at the postman every morning. "
                     "Answer from the numbered sources only; cite the source of each sentence as [n]. "
                     "I don't know. Question: Answer:\n"] * 4, vocab_size=400)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4,
                               max_seq_len=512)).eval()
    run = tmp_path_factory.mktemp("tinyrun")
    save(model, run)
    tok.save(run)
    return model, tok, run


def test_generate_answer_through_the_engine_with_the_chat_template(tiny):
    from lmstack.tokenizer.chat import END_OF_TURN

    model, tok, _ = tiny
    script = tok.encode("Cats eat fish. [1]") + [tok.special_tokens[END_OF_TURN]]
    a = generate_answer("what do cats eat", HITS, ScriptedModel(model, script), tok, GenerateConfig(max_new_tokens=20))
    assert a.generated == "Cats eat fish. [1]" and a.text == "Cats eat fish. [1]" and not a.abstained
    assert [s.chunk_id for s in a.sources] == ["cats#0"]
    wrong = generate_answer("what do cats eat", HITS, ScriptedModel(model, tok.encode("Cats eat fish. [2]") +
                                                                    [tok.special_tokens[END_OF_TURN]]), tok)
    assert wrong.abstained  # cited to the dogs chunk: verification rejects it


def test_rag_query_with_a_model_end_to_end(tiny, tmp_path, capsys):
    _, _, run = tiny
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.txt").write_text("Cats purr when they are happy. Cats eat fish.", encoding="utf-8")
    (docs / "dogs.txt").write_text("Dogs bark at the postman every morning.", encoding="utf-8")
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--retriever", "bm25"]) == 0
    capsys.readouterr()
    assert main(["rag", "query", str(tmp_path / "idx"), "what do cats eat", "--model", str(run), "--k", "2",
                 "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answer", "abstained", "reason", "generated", "sources", "checks"}
    assert out["abstained"] == (out["answer"] == IDK) and out["reason"]
    assert main(["rag", "query", str(tmp_path / "idx"), "what do cats eat", "--model", str(run),
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out["answer"]
    assert main(["rag", "query", str(tmp_path / "idx"), "cats", "--model", str(tmp_path / "no_run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such model folder" in err
    assert main(["rag", "query", str(tmp_path / "idx"), "cats", "--judge", str(run)]) == 2
    assert "give --model RUN as well" in capsys.readouterr().err


def test_render_prompt_without_a_source_label():
    p = render_prompt("q?", [Hit(Chunk("a#0", "a", "", 0, 3, "Abc"), 1.0)])
    assert "\n[1]\nAbc\n" in p


# ------------------------------------------------------------------------------------------ metrics

def test_abstention_precision_recall_hand_computed():
    m = abstention_precision_recall([True, True, False, True, False], [True, False, True, True, False])
    assert (m["precision"], m["recall"], m["abstain_rate_answerable"]) == (2 / 3, 2 / 3, 1 / 2)
    never = abstention_precision_recall([False, False], [True, False])
    assert math.isnan(never["precision"]) and never["recall"] == 0.0


def test_faithfulness_counts_supported_statements():
    ctx = [["Cats purr when they are happy.", "Cats eat fish."]]
    r = faithfulness(["Cats eat fish. [2] Cats purr. [1] Cats bark loudly. [1]"], ctx, FakeJudge())
    assert r.scores == [2 / 3]
    assert statements("Cats eat fish. [1] I don't know.") == ["Cats eat fish."]
    empty = faithfulness([IDK], ctx, FakeJudge())
    assert empty.scores == [None] and empty.failures[0]["reason"] == "the answer has no statement"
    garbled = faithfulness(["Cats ??? [1]"], ctx, FakeJudge())
    assert garbled.scores == [None] and "named neither" in garbled.failures[0]["reason"]


def test_context_precision_is_the_mean_precision_at_useful_ranks():
    ctxs = [["Dogs bark.", "Cats eat fish.", "Birds fly.", "Fish eat cats sometimes."]]
    # useful (reference "cats eat fish" in the context): ranks 2 and 4 -> (1/2 * 1 + 2/4 * 1) / 2 = 0.5
    r = context_precision(["what do cats eat?"], ctxs, ["cats eat fish"], FakeJudge())
    assert r.details[0]["useful"] == [0.0, 1.0, 0.0, 1.0] and r.scores == [0.5]
    assert context_precision(["q"], [["Birds fly."]], ["cats eat fish"], FakeJudge()).scores == [0.0]
    assert context_precision(["q"], [["Cats eat fish.", "x"]], ["cats eat fish"], FakeJudge()).scores == [1.0]


def test_context_recall_counts_attributable_reference_sentences():
    r = context_recall([["Cats eat fish.", "Dogs bark."]], ["Cats eat fish. Dogs bark. Birds fly."], FakeJudge())
    assert r.scores == [2 / 3]


def test_answer_relevancy_is_the_mean_cosine_of_generated_questions():
    vocab = ["what", "cats", "eat", "do", "dogs"]

    def embed(texts):
        return np.array([[re.findall(r"\w+", t.lower()).count(w) for w in vocab] for t in texts], dtype=float)

    judge = FakeJudge({"Cats eat fish.": ["what do cats eat", "what do dogs eat"]})
    r = answer_relevancy(["what do cats eat"], ["Cats eat fish. [1]"], judge, embed, n=2)
    # q = (1,1,1,1,0); g1 = q -> 1; g2 = (1,0,1,1,1) -> 3 / (2 * 2) = 0.75; mean 0.875
    assert r.scores[0] == pytest.approx(0.875, abs=1e-12)
    assert r.details[0]["generated"] == ["what do cats eat", "what do dogs eat"]
    assert answer_relevancy(["q"], [IDK], judge, embed).scores == [0.0]   # noncommittal


# ------------------------------------------------------------------------------------------ IDK data, split

def _articles():
    def para(ctx, q, ans):
        return {"context": ctx, "qas": [{"id": q[:8], "question": q, "answers": [
            {"text": ans, "answer_start": ctx.index(ans)}]}]}
    return [
        {"title": "Cats", "paragraphs": [
            para("Cats are small felines. Cats eat fish and mice every day.", "What do cats eat every day?", "fish"),
            para("A cat sleeps many hours. Cats purr when they are content.", "When do cats purr?", "when they are content")]},
        {"title": "Dogs", "paragraphs": [
            para("Dogs bark at strangers. Dogs eat meat and bones.", "What do dogs eat?", "meat"),
            para("Dogs were domesticated from wolves. Dogs eat dinner at night.", "When do dogs eat dinner?", "at night")]},
    ]


def test_idk_rows_answerable_hold_their_gold_unanswerable_never_do():
    arts = _articles()
    examples = build_idk_examples(arts, IdkConfig(n_context=2, seed=3))
    docs, _ = squad_paragraphs(arts)
    assert len(examples) == 8 and sum(e.answerable for e in examples) == 4
    for e in examples:
        assert len(e.hits) == 2
        ids = [h.chunk.doc_id for h in e.hits]
        if e.answerable:
            assert ids[e.gold - 1] == e.question.doc_id and ids.count(e.question.doc_id) == 1
            assert e.question.answers[0] in e.hits[e.gold - 1].chunk.text
            assert e.target == f"{e.question.answers[0]} [{e.gold}]" and e.opposite == IDK
        else:
            assert e.question.doc_id not in ids
            assert all(e.question.answers[0] not in h.chunk.text for h in e.hits)
            assert e.target == IDK and e.opposite == f"{e.question.answers[0]} [1]"
    sft, pref = sft_rows(examples), dpo_rows(examples)
    assert [r["messages"][1]["content"] for r in sft] == [e.target for e in examples]
    assert all(r["messages"][0]["content"] == p["prompt"] for r, p in zip(sft, pref))
    assert all((p["chosen"] == IDK) != (p["rejected"] == IDK) for p in pref)
    assert build_idk_examples(arts, IdkConfig(n_context=2, seed=3))[0].prompt == examples[0].prompt  # seeded


def test_score_answers_on_hand_made_answers():
    from lmstack.rag.answer import Answer

    examples = build_idk_examples(_articles(), IdkConfig(n_context=2, seed=3))[:4]   # ans, unans, ans, unans
    answers = [Answer(f"{examples[0].question.answers[0]} [1]"), Answer(IDK, abstained=True, generated=IDK),
               Answer(IDK, abstained=True, generated="cats"), Answer("wolves [1]")]
    m = score_answers(examples, answers)
    assert (m["precision"], m["recall"], m["em"], m["answered_em"]) == (0.5, 0.5, 0.5, 1.0)
    assert (m["model_precision"], m["model_recall"]) == (1.0, 0.5)
    assert strip_citations("at night [2][3]") == "at night"


def test_squad_article_split_is_disjoint_stable_and_by_title(shared_data):
    titles = [f"Article {i}" for i in range(200)]
    train, held = squad_article_split(titles, 0.25, seed=0)
    assert not set(train) & set(held) and sorted(train + held) == sorted(titles)
    assert len(held) == 50                              # the one split (split_articles) is exact in size
    # an article's side does not depend on the order the articles come in; the order itself is kept
    assert squad_article_split(titles[::-1], 0.25)[1] == [t for t in titles[::-1] if t in held]
    assert squad_article_split(titles, 0.25, seed=1)[1] != held
    path = shared_data / "rag" / "squad_dev-v1.1.json"
    if not path.is_file():
        pytest.skip("SQuAD dev is absent")
    arts = read_squad(path)
    tr, ev = squad_article_split(arts)
    assert len(tr) + len(ev) == 48 and not {a["title"] for a in tr} & {a["title"] for a in ev}
    tr_docs, _ = squad_paragraphs(tr)
    ev_docs, ev_q = squad_paragraphs(ev)
    assert not {d.text for d in tr_docs} & {d.text for d in ev_docs}
    assert all(q.doc_id.split("/")[0] in {a["title"] for a in ev} for q in ev_q)


def test_with_chat_tokens_adds_the_tokens_and_keeps_the_model(shared_data, tmp_path):
    from lmstack.infer.text import load_run
    from lmstack.rag.idk import CHAT_TOKENS, with_chat_tokens
    from lmstack.tokenizer.chat import render_chat

    src = shared_data / "models" / "stories260K"
    if not src.is_dir():
        pytest.skip("stories260K is absent")
    before, tok0 = load_run(src)
    after, tok = load_run(with_chat_tokens(src, tmp_path / "base"))
    assert [tok.special_tokens[t] for t in CHAT_TOKENS] == [512, 513, 514, 515] and tok.vocab_size == 516
    ids = torch.tensor([tok0.encode("Once upon a time there was a cat.")])
    assert tok.encode("Once upon a time there was a cat.") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(after(ids)[..., :512], before(ids))   # the old rows are untouched: same logits
    chat, mask = render_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert chat[:2] == [1, 513] and chat.count(515) == 2 and sum(mask) == len(tok.encode("ok")) + 1
