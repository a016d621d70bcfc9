"""lmstack.rag.rerank: the losses against hand computations, a cross-encoder head that learns a toy ranking,
bit-exact save/load, hard-negative mining, the SQuAD article split, LLM relevance mechanics, the CLI hook and
one-line errors. Tiny seeded models; no download."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from lmstack.errors import ConfigError, DataError
from lmstack.rag.chunk import Chunk
from lmstack.rag.index import Hit

N_WORDS = 40
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(N_WORDS)]


def word_tokenizer():
    """A BERT-style word-level tokenizer: ``[CLS] a [SEP] b [SEP]`` with token types 0/1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_config():
    from lmstack.model.config import ModelConfig

    return ModelConfig(arch="encoder", vocab_size=len(VOCAB), d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64,
                       norm_position="post", norm_eps=1e-12, embed_norm=True, final_norm=False, type_vocab_size=2,
                       pooler=True, pad_token_id=0)


def tiny_cross_encoder(seed: int = 0, **kw):
    from lmstack.model import build_model
    from lmstack.rag.rerank import CrossEncoder, add_score_head

    torch.manual_seed(seed)
    return CrossEncoder(add_score_head(build_model(tiny_config())), word_tokenizer(), **{"max_length": 32,
                        "max_query_length": 8, "dtype": "fp32", **kw})


def toy_examples(n: int, seed: int = 0, negatives: int = 3):
    """The positive starts with the query's word (one of w0..w9); the negatives hold noise words only (w10..)."""
    from lmstack.rag.rerank import RerankExample

    rng = random.Random(seed)
    noise = lambda k: " ".join(f"w{rng.randrange(10, N_WORDS)}" for _ in range(k))
    out = []
    for _ in range(n):
        key = f"w{rng.randrange(10)}"
        out.append(RerankExample(key, f"{key} {noise(5)}", [noise(6) for _ in range(negatives)]))
    return out


def hit(doc: str, n: int = 0, text: str | None = None, score: float = 0.0) -> Hit:
    cid = f"{doc}#{n}"
    return Hit(Chunk(cid, doc, doc, 0, 1, text if text is not None else cid), score)


# ------------------------------------------------------------------------------------------------ losses

def test_listwise_loss_equals_the_hand_computation():
    from lmstack.rag.rerank import listwise_loss

    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 0.5]])
    by_hand = [math.log(math.e ** 2 + math.e + 1) - 2, math.log(3), math.log(math.e ** -1 + math.e ** 3 + math.e ** 0.5) + 1]
    assert float(listwise_loss(s)) == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    assert float(listwise_loss(torch.zeros(4, 8))) == pytest.approx(math.log(8), abs=1e-6)  # chance: ln(n + 1)


def test_pointwise_loss_equals_the_hand_computation():
    from lmstack.rag.rerank import pointwise_loss

    sig = lambda x: 1 / (1 + math.exp(-x))
    s = torch.tensor([[2.0, 1.0, 0.0]])
    by_hand = -(math.log(sig(2.0)) + math.log(1 - sig(1.0)) + math.log(1 - sig(0.0))) / 3
    assert float(pointwise_loss(s)) == pytest.approx(by_hand, abs=1e-6)


# ------------------------------------------------------------------------------------------ cross-encoder

def test_pair_input_is_the_tokenizers_pair_template_truncated_to_the_window():
    ce = tiny_cross_encoder(max_length=12, max_query_length=3)
    (ids, types), = ce.encode(["w1 w2 w3 w4 w5"], ["w6 w7 w8 w9 w10 w11 w12 w13 w14"])
    # [CLS] 3 query tokens [SEP] | 5 passage tokens [SEP]: 12 = max_length, the query cut to 3
    assert len(ids) == 12 and ids[0] == 2 and ids[4] == 3 and ids[-1] == 3
    assert ids[1:4] == [VOCAB.index(w) for w in ("w1", "w2", "w3")]
    assert ids[5:11] == [VOCAB.index(f"w{i}") for i in range(6, 12)]
    assert types == [0] * 5 + [1] * 7
    assert ce.truncated == 1
    (short, _), = ce.encode(["w1"], ["w2"])
    assert short == [2, 5, 3, 6, 3] and ce.truncated == 1
    batch = ce.collate(ce.encode(["w1", "w1 w2"], ["w3", "w4 w5"]))
    assert batch["input_ids"].shape == (2, 7) and batch["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 7]
    assert "token_type_ids" in batch


def test_training_lowers_the_loss_below_chance_and_fixes_the_ranking(tmp_path):
    from lmstack.rag.rerank import RerankTrainConfig, train_cross_encoder

    examples = toy_examples(96, seed=0)
    ce = tiny_cross_encoder(seed=0)
    test = toy_examples(20, seed=1)
    hits = [[hit(f"p{j}", text=p) for j, p in enumerate([*ex.negatives, ex.positive])] for ex in test]
    before = [ce.rerank(ex.query, h)[0].chunk.text == ex.positive for ex, h in zip(test, hits)]
    cfg = RerankTrainConfig(out=str(tmp_path / "rr"), batch_queries=8, epochs=2, lr=1e-2, dtype="fp32",
                            valid_queries=16, log_every=5, freeze_embeddings=False, warmup_fraction=0.0)
    trained, result = train_cross_encoder(examples, cfg, reranker=ce)
    chance = math.log(4)
    assert result["chance_loss"] == pytest.approx(chance)
    assert abs(result["before"]["val_loss"] - chance) < 0.05          # a fresh head cannot tell them apart
    assert result["after"]["val_loss"] < 0.5 * chance                  # ... and the trained one can
    assert result["last_logged_loss"] < 0.5 * result["first_logged_loss"]
    after = [trained.rerank(ex.query, h)[0].chunk.text == ex.positive for ex, h in zip(test, hits)]
    assert sum(after) >= 18 and sum(before) <= 10
    rows = [json.loads(line) for line in (tmp_path / "rr" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("val_loss" in r for r in rows)
    assert not (tmp_path / "rr" / "checkpoints").exists()


def test_rerank_orders_by_score_and_save_load_is_bit_exact(tmp_path):
    from lmstack.rag.rerank import Reranker, load_reranker

    ce = tiny_cross_encoder(seed=3, dtype="auto")
    with torch.no_grad():  # a random head's scores nearly tie; spread them so the order is meaningful
        ce.model.classifier.weight.mul_(50)
    hits = [hit(f"d{i}", text=t, score=10 - i) for i, t in enumerate(["w3 w4", "w1 w2 w9", "w7", "w5 w5 w5", "w30"])]
    scores = ce.score("w1 w2", [h.chunk.text for h in hits])
    out = ce.rerank("w1 w2", hits)
    assert isinstance(ce, Reranker)
    assert [h.chunk.id for h in out] == [hits[i].chunk.id for i in np.argsort(-scores, kind="stable")]
    assert [h.score for h in out] == sorted(scores.tolist(), reverse=True)
    assert [h.chunk.id for h in ce.rerank("w1 w2", hits, top_k=2)] == [h.chunk.id for h in out[:2]]
    ce.save(tmp_path / "rr")
    for name in ("model.safetensors", "model_config.json", "tokenizer.json", "reranker_config.json"):
        assert (tmp_path / "rr" / name).is_file()
    back = load_reranker(tmp_path / "rr")
    np.testing.assert_array_equal(back.score("w1 w2", [h.chunk.text for h in hits]), scores)
    assert (back.max_length, back.max_query_length) == (32, 8)


def test_rerank_head_keeps_the_tail_and_an_empty_list():
    from lmstack.rag.rerank import rerank_head

    ce = tiny_cross_encoder(seed=1)
    hits = [hit(f"d{i}", text=f"w{i + 1}", score=-i) for i in range(6)]
    out = rerank_head(ce, "w2", hits, depth=3)
    assert {h.chunk.id for h in out[:3]} == {h.chunk.id for h in hits[:3]}
    assert out[3:] == hits[3:]
    assert rerank_head(ce, "w2", [], depth=3) == []


def test_fusion_with_the_first_stage_is_weighted_min_max():
    from lmstack.rag.rerank import fuse_with_first_stage

    first = [hit("a", score=3.0), hit("b", score=2.0), hit("c", score=1.0)]
    reranked = [hit("c", score=5.0), hit("a", score=1.0), hit("b", score=0.0)]
    # min-max: first a 1, b 0.5, c 0; reranker c 1, a 0.2, b 0; 0.5/0.5 -> a 0.6, c 0.5, b 0.25
    out = fuse_with_first_stage(first, reranked, 0.5)
    assert [h.chunk.doc_id for h in out] == ["a", "c", "b"]
    assert [h.score for h in out] == pytest.approx([0.6, 0.5, 0.25])
    assert [h.chunk.doc_id for h in fuse_with_first_stage(first, reranked, 1.0)] == ["c", "a", "b"]
    assert [h.chunk.doc_id for h in fuse_with_first_stage(first, reranked, 0.0)] == ["a", "b", "c"]
    with pytest.raises(DataError, match="the same hits"):
        fuse_with_first_stage(first, reranked[:2], 0.5)


def test_bad_input_is_one_line(tmp_path):
    from lmstack.rag.rerank import load_reranker

    ce = tiny_cross_encoder()
    with pytest.raises(DataError, match=r"^rerank: no hits to rerank \(the first-stage retriever returned none\); "
                                        r"retrieve first$"):
        ce.rerank("w1", [])
    with pytest.raises(ConfigError, match="rerank: the query is empty"):
        ce.rerank("  ", [hit("a")])
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        ce.rerank("w1", [hit("a")], top_k=0)
    (tmp_path / "notone").mkdir()
    with pytest.raises(ConfigError) as e:
        load_reranker(tmp_path / "notone")
    assert str(e.value) == (f"--rerank {tmp_path / 'notone'}: not a reranker folder (no reranker_config.json); "
                            f"train one with `lmstack rag train-reranker`")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such folder"):
        load_reranker(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"max_length: must be in \[8, 64\]"):
        tiny_cross_encoder(max_length=100)


# --------------------------------------------------------------------------------------------- mining

def test_hard_negative_mining_never_returns_the_positive():
    from lmstack.rag.rerank import mine_hard_negatives

    bm25 = [hit("a"), hit("pos", 0), hit("b"), hit("c"), hit("dup", text="the positive text")]
    dense = [hit("pos", 1), hit("b"), hit("d"), hit("a"), hit("e")]
    negs = mine_hard_negatives([bm25, dense], ["pos"], 10, positive_text="the positive text")
    ids = [c.id for c in negs]
    assert ids == ["a#0", "b#0", "d#0", "c#0", "e#0"]   # in turn from each ranking, each chunk once
    assert all(c.doc_id != "pos" for c in negs) and all(c.text != "the positive text" for c in negs)
    assert [c.id for c in mine_hard_negatives([bm25, dense], ["pos"], 2)] == ["a#0", "b#0"]
    rng = random.Random(0)
    for _ in range(200):  # random rankings: never a relevant chunk, never a repeat
        docs = [f"d{i}" for i in range(8)]
        lists = [[hit(rng.choice(docs), rng.randrange(2)) for _ in range(6)] for _ in range(2)]
        rel = set(rng.sample(docs, 2))
        got = mine_hard_negatives(lists, rel, 5)
        assert not {c.doc_id for c in got} & rel and len({c.id for c in got}) == len(got)
    with pytest.raises(ConfigError, match="negatives: must be >= 1"):
        mine_hard_negatives([bm25], ["pos"], 0)


def test_training_examples_mine_from_the_allowed_documents_only():
    from lmstack.rag.index import BM25Index, Query
    from lmstack.rag.rerank import training_examples
    from lmstack.rag.retrieve import Question

    texts = {"a": "cats purr and eat fish", "b": "cats sleep all day", "c": "cats chase mice at night",
             "d": "dogs bark at cats", "e": "cats and dogs play", "f": "fish swim in cats bowls"}
    index = BM25Index()
    index.add([Chunk(f"{k}#0", k, k, 0, len(v), v, title="train" if k != "f" else "held") for k, v in texts.items()])
    qs = [Question("what do cats eat", ["a"]), Question("when do cats chase mice", ["c"])]
    examples, stats = training_examples(index, [Query(q.question) for q in qs], qs, n_negatives=3, depth=10,
                                        where={"title": "train"})
    assert stats == {"questions": 2, "no_positive": 0, "few_negatives": 0, "examples": 2}
    assert [e.positive for e in examples] == [texts["a"], texts["c"]]
    for e in examples:
        assert len(e.negatives) == 3 and e.positive not in e.negatives and texts["f"] not in e.negatives
    few, stats = training_examples(index, [Query(q.question) for q in qs], qs, n_negatives=5, depth=10,
                                   where={"title": "train"})
    assert few == [] and stats["few_negatives"] == 2


# ----------------------------------------------------------------------------------------- article split

def test_article_split_is_disjoint_deterministic_and_order_free():
    from lmstack.rag.squad import split_articles

    titles = [f"Article_{i}" for i in range(48)]
    train, held = split_articles(titles, 0.5, seed=0)
    assert len(held) == 24 and len(train) == 24 and not set(train) & set(held)
    assert sorted(train + held) == sorted(titles)
    shuffled = titles[:]
    random.Random(1).shuffle(shuffled)
    assert split_articles(shuffled + titles[:5], 0.5, seed=0) == (train, held)   # order and repeats do not matter
    assert split_articles(titles, 0.5, seed=1) != (train, held)
    assert len(split_articles(titles, 0.25, seed=0)[1]) == 12
    with pytest.raises(ConfigError, match=r"eval_fraction: must be in \(0, 1\)"):
        split_articles(titles, 1.0)
    with pytest.raises(DataError, match="need at least 2 articles"):
        split_articles(["one"], 0.5)


def test_squad_split_keeps_every_question_with_its_article(shared_data):
    from lmstack.rag.squad import load_squad, questions_in, split_articles

    path = shared_data / "rag" / "squad_dev-v1.1.json"
    if not path.is_file():
        pytest.skip("SQuAD v1.1 dev not in the shared data")
    docs, questions = load_squad(path)
    train, held = split_articles({d.title for d in docs})
    title = {d.id: d.title for d in docs}
    qt, qh = questions_in(questions, docs, train), questions_in(questions, docs, held)
    assert len(qt) + len(qh) == len(questions) == 10570 and len(train) + len(held) == 48
    assert {title[q.relevant[0]] for q in qt} <= set(train) and {title[q.relevant[0]] for q in qh} <= set(held)


# ---------------------------------------------------------------------------------------------- LLM relevance

class WordTok:
    """A word-level stand-in for an lmstack tokenizer (encode / bos_id / eos_id / special_tokens)."""
    bos_id, eos_id, pad_id, special_tokens = None, None, None, {}

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        import zlib

        return [1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in text.split()]


def test_llm_relevance_is_logit_yes_minus_no_of_one_forward():
    from lmstack.model import build_model, preset
    from lmstack.rag.rerank import LLMRelevance

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=97, d_model=32, n_head=4, n_kv_head=2, n_layer=2,
                               max_seq_len=64)).eval()
    tok = WordTok(97)
    llm = LLMRelevance(model, tok, batch_size=2)
    yes, no = llm.answer_ids()
    passages = ["cats purr", "dogs bark at the moon all night long", "birds", "fish swim in the sea"]
    scores = llm.score("what do cats do", passages)
    assert scores.shape == (4,) and scores.dtype == np.float32
    for p, s in zip(passages, scores):  # one forward of the prompt alone: the last position's logits
        ids = torch.tensor([llm.prompt_ids("what do cats do", p)])
        with torch.no_grad():
            logits = model(ids)[0] if isinstance(model(ids), tuple) else model(ids)
        ref = logits[0, -1].float()
        assert s == pytest.approx(float(ref[yes] - ref[no]), abs=1e-4)
    hits = [hit(f"d{i}", text=p) for i, p in enumerate(passages)]
    out = llm.rerank("what do cats do", hits)
    assert [h.chunk.text for h in out] == [passages[i] for i in np.argsort(-scores, kind="stable")]
    long = llm.prompt_ids("q", "word " * 500)          # cut to the context, one position left for the answer
    assert len(long) <= 63 and llm.truncated == 1


def test_llm_relevance_on_stories260k(shared_data):
    from lmstack.rag.rerank import LLMRelevance

    folder = shared_data / "models" / "stories260K"
    if not folder.is_dir():
        pytest.skip("stories260K not in the shared data")
    llm = LLMRelevance.from_run(folder)
    passages = ["Lily had a red ball. She played with it in the park.", "The sun was hot.", "Tom ate an apple."]
    scores = llm.score("What did Lily play with?", passages)
    assert np.isfinite(scores).all() and scores.shape == (3,)
    out = llm.rerank("What did Lily play with?", [hit(f"d{i}", text=p) for i, p in enumerate(passages)])
    assert [h.score for h in out] == sorted(scores.tolist(), reverse=True)


# ------------------------------------------------------------------------------------------------------- CLI

def test_cli_train_reranker_then_eval_and_query_with_it(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.model import build_model, hf

    torch.manual_seed(0)
    base = tmp_path / "base"
    hf.save(build_model(tiny_config()), base)
    word_tokenizer().save(str(base / "tokenizer.json"))
    docs = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"w{i} w{i + 10} w{(i * 7) % 20 + 20} w39"} for i in range(10)]  # w39: all
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"question": f"w{i} w{i + 10} w39", "relevant": [f"d{i}"]}) + "\n"
                          for i in range(10)), encoding="utf-8")
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--retriever", "bm25",
                 "--chunker", "none"]) == 0
    assert main(["rag", "train-reranker", str(tmp_path / "idx"), str(qs), "--out", str(tmp_path / "rr"),
                 "--base", str(base), "--negatives", "2", "--steps", "3", "--batch-queries", "2",
                 "--max-length", "32", "--dtype", "fp32"]) == 0
    out = capsys.readouterr()
    assert "trained 3 steps on" in out.out and "10 training questions" in out.err
    assert main(["rag", "eval", str(tmp_path / "idx"), str(qs), "--k", "1,5", "--json", "--rerank",
                 str(tmp_path / "rr")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"bm25", "bm25+rerank"} and result["bm25"]["recall@1"] == 1.0
    assert 0.0 <= result["bm25+rerank"]["recall@1"] <= 1.0
    assert main(["rag", "query", str(tmp_path / "idx"), "w3 w39", "--k", "2", "--json", "--rerank",
                 str(tmp_path / "rr")]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["rag", "query", str(tmp_path / "idx"), "w3", "--rerank", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: --rerank {tmp_path}: not a reranker folder (no reranker_config.json); train one with "
                    f"`lmstack rag train-reranker`")]


def test_cli_rerank_with_an_llm(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    docs = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"the kettle {i} boils water in {i} minutes"} for i in range(6)]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"question": f"kettle {i} minutes", "relevant": [f"d{i}"]}) + "\n"
                          for i in range(6)), encoding="utf-8")
    tok = train_bpe(["Passage: the kettle boils water. Question: is it relevant? Answer: yes no\n" * 6],
                    vocab_size=300)
    torch.manual_seed(0)
    llm = tmp_path / "llm"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_head=2, max_seq_len=256)),
         llm)
    tok.save(llm)
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--retriever", "bm25",
                 "--chunker", "none"]) == 0
    capsys.readouterr()
    assert main(["rag", "eval", str(tmp_path / "idx"), str(qs), "--k", "1,5", "--json", "--rerank-llm", str(llm),
                 "--rerank-depth", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"bm25", "bm25+rerank"}
    # only the top 3 are re-ordered: whatever the LLM thinks, recall@5 cannot change
    assert result["bm25+rerank"]["recall@5"] == result["bm25"]["recall@5"]
    assert main(["rag", "query", str(tmp_path / "idx"), "kettle", "--rerank-llm", str(llm), "--rerank",
                 str(llm)]) == 2
    assert capsys.readouterr().err.strip() == "error: --rerank and --rerank-llm: pick one reranker"
