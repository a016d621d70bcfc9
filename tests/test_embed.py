"""lmstack.embed: vocabulary, word2vec, GloVe, queries, file formats, evaluation parity with gensim, CLI, speedrun."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.embed import GloVeConfig, VocabConfig, Word2VecConfig, WordVectors, build_corpus, load_vectors
from lmstack.errors import ConfigError, DataError, LmstackError

GROUPS = [[f"red{i}" for i in range(10)], [f"blue{i}" for i in range(10)]]


def planted_sentences(n: int = 1500, length: int = 12, seed: int = 0, mix: float = 0.0) -> list[list[str]]:
    """Sentences that each use the words of one group (and a ``mix`` share of the other group's): a word's
    neighbours should be its group."""
    rng = random.Random(seed)
    return [[rng.choice(GROUPS[(s + (rng.random() < mix)) % 2]) for _ in range(length)] for s in range(n)]


def same_group_rate(wv: WordVectors, topn: int = 5) -> float:
    hits = total = 0
    for group in GROUPS:
        for w in group:
            for n, _ in wv.neighbors(w, topn):
                hits += n in group
                total += 1
    return hits / total


# ---------------------------------------------------------------------------------------------------------
# vocabulary


def test_vocab_orders_by_count_then_first_appearance_and_drops_rare_words():
    vocab, corpus = build_corpus([["b", "a", "c", "a"], ["c", "d", "b", "e"], ["a"]], VocabConfig(min_count=2))
    assert vocab.words == ["a", "b", "c"] and vocab.counts.tolist() == [3, 2, 2]
    # d and e are dropped from the text, as word2vec drops words under min_count
    assert corpus.ids.tolist() == [1, 0, 2, 0, 2, 1, 0] and corpus.sentence.tolist() == [0, 0, 0, 0, 1, 1, 2]
    vocab, _ = build_corpus([["b", "a", "c", "a"], ["c", "d", "b", "e"]], VocabConfig(min_count=1, max_vocab=2))
    assert vocab.words == ["b", "a"]          # three words seen twice: the first two seen win


def test_vocab_from_text_and_jsonl_files_is_the_same_and_lowercases(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat.\nThe DOG didn't sit!\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "The cat sat.\nThe DOG didn't sit!"}) + "\n")
    v1, c1 = build_corpus([tmp_path / "a.txt"], VocabConfig(min_count=1))
    v2, c2 = build_corpus([tmp_path / "b.jsonl"], VocabConfig(min_count=1))
    assert v1.words == v2.words == ["the", "cat", "sat", "dog", "didn't", "sit"]
    assert c1.ids.tolist() == c2.ids.tolist() and c1.sentence.tolist() == [0, 0, 0, 1, 1, 1, 1]
    v3, _ = build_corpus([tmp_path / "a.txt"], VocabConfig(min_count=1, split="whitespace", lowercase=False))
    assert v3.words == ["The", "cat", "sat.", "DOG", "didn't", "sit!"]


def test_vocab_from_an_lmstack_tokenizer_uses_its_tokens_as_words(tmp_path):
    from lmstack.tokenizer import load_tokenizer
    from lmstack.train.data import byte_tokenizer

    byte_tokenizer().save(tmp_path)
    (tmp_path / "t.txt").write_text("ab ab\nba\n")
    vocab, corpus = build_corpus([tmp_path / "t.txt"], VocabConfig(split="tokenizer", tokenizer=str(tmp_path),
                                                                  min_count=1))
    assert vocab.words == ["a", "b", "▁"] and vocab.counts.tolist() == [3, 3, 1]   # the space shown as ▁
    tok = load_tokenizer(tmp_path)
    assert corpus.words == len(tok.encode("ab ab")) + len(tok.encode("ba"))


def test_subsampling_matches_gensims_probabilities():
    gensim = pytest.importorskip("gensim")
    from lmstack.embed.word2vec import keep_probabilities

    sents = planted_sentences(300) + [["the"] * 50 + ["rare"]]
    vocab, _ = build_corpus(sents, VocabConfig(min_count=1))
    model = gensim.models.Word2Vec(vector_size=4, min_count=1, sample=1e-3)
    model.build_vocab(sents)
    # the same words by count (gensim breaks ties the other way: the last seen first)
    assert sorted(model.wv.index_to_key) == sorted(vocab.words)
    assert [model.wv.get_vecattr(w, "count") for w in vocab.words] == vocab.counts.tolist()
    ours = np.uint32(keep_probabilities(vocab.counts, 1e-3) * (2**32 - 1))
    theirs = np.array([model.wv.get_vecattr(w, "sample_int") for w in vocab.words], dtype=np.uint32)
    assert np.array_equal(ours, theirs) and ours.min() < 2**31 < ours.max()


def test_noise_table_follows_the_unigram_to_the_075():
    from lmstack.embed.word2vec import noise_table

    counts = np.array([1000, 100, 10, 1])
    table = noise_table(counts, 0.75, size=10**6)
    share = np.bincount(table, minlength=4) / table.size
    want = counts**0.75 / (counts**0.75).sum()
    assert np.abs(share - want).max() < 2e-6


def test_dynamic_window_stays_in_the_sentence_and_covers_every_width():
    from lmstack.embed.word2vec import context_positions

    sentence = np.repeat(np.arange(100), 7)
    pos, valid = context_positions(sentence, 0, sentence.size, 3, np.random.default_rng(0))
    centre = np.arange(sentence.size)[:, None]
    dist = np.abs(pos - centre)
    assert (sentence[pos][valid] == np.broadcast_to(sentence[:, None], pos.shape)[valid]).all()
    assert dist[valid].max() == 3 and dist[valid].min() == 1
    widths = np.where(valid, dist, 0).max(axis=1)
    # centres in the middle of a sentence reach 1, 2 or 3 words each side, about equally often
    counts = np.bincount(widths[3::7], minlength=4)[1:]
    assert counts.min() > 20


# ---------------------------------------------------------------------------------------------------------
# word2vec


@pytest.mark.parametrize("sg,shared,workers", [(True, False, 1), (True, True, 1), (False, False, 1), (True, False, 2)],
                         ids=["sg", "sg-shared", "cbow", "sg-hogwild-2"])
def test_word2vec_neighbours_come_from_the_planted_group(sg, shared, workers, tmp_path):
    from lmstack.embed import train_word2vec
    from lmstack.runs import read_jsonl

    cfg = Word2VecConfig(dim=16, window=3, epochs=3, sg=sg, shared_negatives=shared, sample=0, batch_size=256,
                         alpha=0.05 if not sg else 0.025, workers=workers)
    wv, history = train_word2vec(planted_sentences(), cfg, VocabConfig(min_count=1), log_path=tmp_path / "log.jsonl",
                                 progress=False)
    # chance is 9/19 (a word's 19 others, 9 in its group); planted structure gives all of them
    assert same_group_rate(wv) > 0.95
    assert history[-1]["loss"] < history[0]["loss"]
    log = read_jsonl(tmp_path / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(r["method"] == "word2vec" for r in log)


def test_training_shows_progress_on_stderr(capsys):
    from lmstack.embed import train_word2vec

    train_word2vec(planted_sentences(100), Word2VecConfig(dim=4, window=2, epochs=1), VocabConfig(min_count=1))
    err = capsys.readouterr().err
    assert "word2vec skip-gram" in err and "words/s" in err and "loss=" in err and "eta" in err


def test_word2vec_is_deterministic_for_a_seed():
    from lmstack.embed import train_word2vec

    cfg = Word2VecConfig(dim=8, window=2, epochs=1, batch_size=128)
    a, _ = train_word2vec(planted_sentences(200), cfg, VocabConfig(min_count=1), progress=False)
    b, _ = train_word2vec(planted_sentences(200), cfg, VocabConfig(min_count=1), progress=False)
    assert np.array_equal(a.vectors, b.vectors)


# ---------------------------------------------------------------------------------------------------------
# GloVe


def test_cooccurrence_weights_by_inverse_distance_within_sentences():
    from lmstack.embed.glove import cooccurrence

    vocab, corpus = build_corpus([["a", "b", "c"], ["c", "a"]], VocabConfig(min_count=1))
    x = cooccurrence(corpus, len(vocab), window=2).dense()
    a, b, c = (vocab.index[w] for w in "abc")
    assert x[a, b] == x[b, a] == 1.0
    assert x[b, c] == 1.0
    assert x[a, c] == x[c, a] == 0.5 + 1.0      # distance 2 in the first sentence, 1 in the second
    assert x[a, a] == 0 and np.array_equal(x, x.T)


def test_glove_recovers_a_known_low_rank_log_cooccurrence():
    from lmstack.embed.glove import Cooccurrence, fit_glove

    rng = np.random.default_rng(0)
    V, r = 60, 4
    w, c = rng.normal(0, 0.6, (V, r)), rng.normal(0, 0.6, (V, r))
    logx = w @ c.T + rng.normal(0, 0.5, V)[:, None] + rng.normal(0, 0.5, V)[None, :] + 3.0   # X in ~[0.3, 1400]
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(V), np.arange(V), indexing="ij"))
    x = Cooccurrence(rows, cols, np.exp(logx).ravel(), V)
    params, history = fit_glove(x, GloVeConfig(dim=r, epochs=60, lr=0.2, batch_size=256), progress=False)
    err = params.log_fit(rows, cols) - logx.ravel()
    # log X has std 1.0; the rank-4 fit with biases reproduces it to 1e-3 RMS (measured 5e-5), every entry to 1e-2
    assert np.sqrt((err**2).mean()) < 1e-3 and np.abs(err).max() < 1e-2
    assert history[-1]["loss"] < 1e-6 * history[0]["loss"]


def test_glove_loss_falls_and_neighbours_come_from_the_planted_group(tmp_path):
    from lmstack.embed import train_glove

    # GloVe fits only the pairs that occur, so the other group must occur a little for the fit to push it away
    wv, history = train_glove(planted_sentences(600, mix=0.1), GloVeConfig(dim=16, window=4, epochs=15),
                              VocabConfig(min_count=1), log_path=tmp_path / "g.jsonl", progress=False)
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0] and all(b <= a * 1.01 for a, b in itertools.pairwise(losses))
    assert same_group_rate(wv) > 0.95


# ---------------------------------------------------------------------------------------------------------
# queries and files


def small_vectors(seed: int = 0, n: int = 40, dim: int = 6) -> WordVectors:
    rng = np.random.default_rng(seed)
    return WordVectors([f"w{i}" for i in range(n)], rng.normal(size=(n, dim)).astype(np.float32),
                       np.arange(n, 0, -1) * 10)


def test_neighbours_and_analogies_equal_gensims_and_exclude_the_question_words():
    gensim = pytest.importorskip("gensim")
    wv = small_vectors()
    kv = gensim.models.KeyedVectors(wv.dim)
    kv.add_vectors(wv.words, wv.vectors)
    assert [w for w, _ in wv.neighbors("w3", 5)] == [w for w, _ in kv.most_similar("w3", topn=5)]
    for a, b, c in [("w1", "w2", "w3"), ("w7", "w0", "w12")]:
        add = wv.analogy(a, b, c, topn=5)
        assert [w for w, _ in add] == [w for w, _ in kv.most_similar(positive=[b, c], negative=[a], topn=5)]
        mul = wv.analogy(a, b, c, topn=5, method="mul", eps=1e-6)      # gensim's epsilon
        ref = kv.most_similar_cosmul(positive=[b, c], negative=[a], topn=5)
        assert [w for w, _ in mul] == [w for w, _ in ref]
        np.testing.assert_allclose([s for _, s in mul], [s for _, s in ref], rtol=1e-5)
        assert not {a, b, c} & {w for w, _ in add + mul}


def test_an_unknown_word_names_itself():
    with pytest.raises(LmstackError, match=r"word 'nope' is not in the vocabulary \(40 words\)"):
        small_vectors().neighbors("nope")
    with pytest.raises(LmstackError, match="'zzz'"):
        small_vectors().analogy("w1", "zzz", "w2")


@pytest.mark.parametrize("name", ["v.txt", "v.bin", "folder"])
def test_save_and_load_round_trip(tmp_path, name):
    wv = small_vectors()
    back = load_vectors(wv.save(tmp_path / name))
    assert back.words == wv.words
    if name == "v.txt":
        np.testing.assert_allclose(back.vectors, wv.vectors, rtol=1e-5, atol=1e-6)  # 6 significant digits
    else:
        assert np.array_equal(back.vectors, wv.vectors)
    if name == "folder":
        assert back.counts.tolist() == wv.counts.tolist()


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_gensim_reads_our_word2vec_files_and_we_read_its(tmp_path, binary):
    gensim = pytest.importorskip("gensim")
    wv = small_vectors()
    ours = wv.save(tmp_path / ("ours.bin" if binary else "ours.txt"))
    kv = gensim.models.KeyedVectors.load_word2vec_format(str(ours), binary=binary)
    assert kv.index_to_key == wv.words
    np.testing.assert_allclose(kv.vectors, wv.vectors, rtol=1e-5, atol=1e-6)
    theirs = tmp_path / ("theirs.bin" if binary else "theirs.txt")
    kv.save_word2vec_format(str(theirs), binary=binary)
    back = load_vectors(theirs)
    assert back.words == wv.words
    np.testing.assert_allclose(back.vectors, kv.vectors, rtol=1e-5, atol=1e-6)


def test_a_word_with_a_space_cannot_go_into_the_word2vec_formats(tmp_path):
    wv = WordVectors(["a b"], np.zeros((1, 2)))
    with pytest.raises(LmstackError, match="save as a folder"):
        wv.save(tmp_path / "x.txt")
    assert load_vectors(wv.save(tmp_path / "dir")).words == ["a b"]


# ---------------------------------------------------------------------------------------------------------
# evaluation: the same numbers as gensim on the same vectors


def planted_analogy_vectors(seed: int = 0) -> WordVectors:
    """Vectors for the words of the first two analogy sections where country = capital + a shared offset + noise,
    so some questions are right and some wrong; plus an upper-case variant, and filler words."""
    from lmstack.embed.evaluate import ANALOGIES, gensim_data

    rng = np.random.default_rng(seed)
    pairs = []
    section = 0
    for line in gensim_data(ANALOGIES).read_text().splitlines():
        if line.startswith(":"):
            section += 1
            if section > 2:
                break
            continue
        a, b, _, _ = line.split()
        pairs.append((a.lower(), b.lower()))
    pairs = list(dict.fromkeys(pairs))[:60]
    dim = 20
    offset = rng.normal(size=dim)
    words, vecs = [], []
    for cap, country in pairs:
        for w, v in ((cap, rng.normal(size=dim)), (country, None)):
            if w in words:
                continue
            words.append(w)
            vecs.append(v if v is not None else vecs[words.index(cap)] + offset + rng.normal(scale=1.2, size=dim))
    words += ["ATHENS", "filler1", "filler2"]
    vecs += [rng.normal(size=dim) for _ in range(3)]
    return WordVectors(words, np.array(vecs, np.float32))


def test_analogy_accuracy_equals_gensims_evaluate_word_analogies():
    gensim = pytest.importorskip("gensim")
    from lmstack.embed.evaluate import ANALOGIES, analogy_accuracy, gensim_data

    wv = planted_analogy_vectors()
    kv = gensim.models.KeyedVectors(wv.dim)
    kv.add_vectors(wv.words, wv.vectors)
    for restrict in (300_000, 50):
        score, sections = kv.evaluate_word_analogies(str(gensim_data(ANALOGIES)), restrict_vocab=restrict)
        ours = analogy_accuracy(wv, restrict_vocab=restrict)
        total = sections[-1]
        assert ours["correct"] == len(total["correct"])
        assert ours["total"] == len(total["correct"]) + len(total["incorrect"])
        assert ours["accuracy"] == pytest.approx(score) and 0.1 < score < 0.9   # neither trivial nor perfect


def test_wordsim_spearman_equals_gensims_evaluate_word_pairs():
    gensim = pytest.importorskip("gensim")
    from lmstack.embed.evaluate import WORDSIM, gensim_data, word_similarity

    path = gensim_data(WORDSIM)
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            words += [w.lower() for w in line.split("\t")[:2]]
    words = list(dict.fromkeys(words))[:150]              # some pairs have a word outside: skipped by both
    rng = np.random.default_rng(1)
    wv = WordVectors(words, rng.normal(size=(len(words), 8)).astype(np.float32))
    kv = gensim.models.KeyedVectors(8)
    kv.add_vectors(wv.words, wv.vectors)
    pearson, spear, oov = kv.evaluate_word_pairs(str(path))
    ours = word_similarity(wv)
    assert ours["spearman"] == pytest.approx(spear.statistic, abs=1e-9)
    assert ours["pearson"] == pytest.approx(pearson.statistic, abs=1e-6)
    assert ours["oov_ratio"] == pytest.approx(oov) and 0 < oov < 100


def test_spearman_handles_ties_like_scipy():
    stats = pytest.importorskip("scipy.stats")
    from lmstack.embed.evaluate import spearman

    x = np.array([1, 2, 2, 3, 5, 5, 5, 0.5])
    y = np.array([2, 1, 4, 3, 3, 7, 7, 1])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"^word2vec.dim: must be >= 1 \(the vector size, e.g. 100\), got 0$"):
        Word2VecConfig(dim=0)
    with pytest.raises(ConfigError, match=r"^glove.dim: must be >= 1"):
        GloVeConfig(dim=-1)
    with pytest.raises(ConfigError, match=r"^vocab.min_count: must be >= 1"):
        VocabConfig(min_count=0)
    with pytest.raises(ConfigError, match="^word2vec.compile: only the per-pair skip-gram update is compiled"):
        Word2VecConfig(sg=False, compile=True)
    with pytest.raises(ConfigError, match="vocab.tokenizer: split='tokenizer' needs"):
        VocabConfig(split="tokenizer")


def test_bad_corpora_are_one_line_errors(tmp_path):
    from lmstack.embed import train_word2vec

    (tmp_path / "punct.txt").write_text("... !!! ???\n")
    with pytest.raises(DataError, match="^corpus: no words found in the input"):
        build_corpus([tmp_path / "punct.txt"])
    (tmp_path / "few.txt").write_text("one two three\n")
    with pytest.raises(DataError, match=r"^vocab.min_count: no word occurs 5 times or more \(3 words, 3 distinct"):
        build_corpus([tmp_path / "few.txt"])
    with pytest.raises(DataError, match=r"^word2vec.window: the window \(5\) is not smaller than the vocabulary "
                                        r"\(3 words\); lower the window"):
        train_word2vec([tmp_path / "few.txt"], Word2VecConfig(), VocabConfig(min_count=1), progress=False)


def test_cli_train_query_eval_and_exit_code_2(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("\n".join(" ".join(s) for s in planted_sentences(400)))
    out = tmp_path / "run"
    assert main(["embed", "train", str(data), "--out", str(out), "--dim", "8", "--epochs", "2", "--window", "3",
                 "--min-count", "1", "--sample", "0", "--formats", "bin,txt", "--quiet"]) == 0
    assert "word2vec: 20 words x 8" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"vectors.safetensors", "vocab.json", "vectors.bin", "vectors.txt",
                                               "config.json", "summary.json", "train_log.jsonl"}
    assert main(["embed", "neighbors", str(out), "red1", "--topn", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.split()[1].startswith("red") for line in lines)
    assert main(["embed", "analogy", str(out / "vectors.bin"), "red1", "red2", "blue3", "--topn", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    from lmstack.embed.evaluate import ANALOGIES, gensim_data

    assert main(["embed", "eval", str(out)]) == 0
    text = capsys.readouterr().out
    if gensim_data(ANALOGIES) is None:
        assert text.startswith("evaluation skipped: gensim is not installed")
    else:   # none of the planted words is in either set
        assert text == ("analogies (3CosAdd): n/a of 0 in-vocabulary questions (100.0% skipped); 3CosMul: n/a\n"
                        "WordSim-353 Spearman: n/a on 0 pairs (100.0% skipped)\n")
    assert main(["embed", "neighbors", str(out), "green"]) == 2
    assert capsys.readouterr().err == ("error: word 'green' is not in the vocabulary (20 words); check its spelling "
                                       "and case (training lowercases by default), or train with a lower min_count\n")
    assert main(["embed", "train", str(data), "--out", str(out), "--dim", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: word2vec.dim: must be >= 1")
    assert main(["embed", "train", str(data), "--out", str(out), "--window", "25", "--min-count", "1"]) == 2
    assert "word2vec.window: the window (25) is not smaller than the vocabulary (20 words)" in capsys.readouterr().err
    assert main(["embed", "train", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert main(["embed", "train", str(data), "--out", str(out), "--method", "fasttext"]) == 2
    assert capsys.readouterr().err.strip().endswith("use word2vec or glove")


def test_cli_trains_glove(tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(s)}) for s in planted_sentences(300)) + "\n")
    out = tmp_path / "g"
    assert main(["embed", "train", str(data), "--method", "glove", "--out", str(out), "--dim", "8", "--epochs", "5",
                 "--window", "3", "--min-count", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("glove: 20 words x 8")
    assert json.loads((out / "config.json").read_text())["glove"]["window"] == 3


def test_speedrun_stage_on_a_small_corpus(tmp_path):
    from lmstack.embed.speedrun import speedrun_embed

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": " ".join(s), "source": "x"}) for s in planted_sentences(2000)) + "\n")
    results, report = speedrun_embed(tmp_path, dim=8, epochs=3, window=3, min_count=1, words=["red1", "blue2"],
                                     seed=0)
    assert set(results["neighbors"]) == {"red1", "blue2"}
    assert all(n.startswith("red") for n, _ in results["neighbors"]["red1"])
    assert "| red1 |" in report and (tmp_path / "embed" / "vectors.safetensors").is_file()
    assert results["loss_last"] < results["loss_first"]
    assert ("Google analogies" in report) or ("skipped" in report)


def test_the_compiled_pair_update_computes_the_eager_update(monkeypatch):
    """The elementwise update that torch.compile fuses, run eagerly through the padded batching, moves the
    matrices exactly as the bmm path does (same pairs, same noise words)."""
    import torch

    from lmstack.embed import word2vec as w2v

    rng = np.random.default_rng(0)
    V, d = 200, 8
    ids = torch.from_numpy(rng.integers(0, V, 90))
    sentence = np.repeat(np.arange(3), 30)
    pos, valid = w2v.context_positions(sentence, 0, 90, 2, np.random.default_rng(1))
    cfg = Word2VecConfig(dim=d, negative=3, batch_size=64)   # 64 pairs a batch: the last batch is padded
    table = torch.from_numpy(w2v.noise_table(np.arange(V, 0, -1), 0.75, size=10_000))
    w_in0, w_out0 = torch.randn(V, d, dtype=torch.float32), torch.randn(V, d) * 0.1
    a_in, a_out, b_in, b_out = w_in0.clone(), w_out0.clone(), w_in0.clone(), w_out0.clone()
    w2v._skipgram_chunk(ids, 0, pos, valid, a_in, a_out, table, cfg, 0.05, torch.Generator().manual_seed(3))
    monkeypatch.setitem(w2v._COMPILED, "pair", w2v._pair_update)            # eager, to keep the test fast
    w2v._skipgram_compiled_chunk(ids, 0, pos, valid, b_in, b_out, table, cfg, 0.05, torch.Generator().manual_seed(3))
    assert valid.sum() % 64 != 0 and not torch.equal(a_in, w_in0)
    torch.testing.assert_close(b_in, a_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_out, a_out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_skipgram_learns_the_planted_groups():
    from lmstack.embed import train_word2vec

    cfg = Word2VecConfig(dim=16, window=3, epochs=3, sample=0, batch_size=256, compile=True)
    wv, _ = train_word2vec(planted_sentences(), cfg, VocabConfig(min_count=1), progress=False)
    assert same_group_rate(wv) > 0.95
