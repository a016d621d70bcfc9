"""String and n-gram metrics: parity with sacrebleu, rouge-score, nltk METEOR and rapidfuzz; bad input."""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.eval import compute_metric, list_metrics
from lmstack.eval.metrics.text import levenshtein_distance

HYPS = [
    "The cat sat on the mat.",
    "It is a guide to action which ensures that the military always obeys the commands of the party.",
    "the quick brown foxes were jumping over lazy dogs",
    "Hello there, general Kenobi!",
    "A completely different sentence with nothing in common",
    "running runners ran quickly\nto the big house on the hill",
]
REFS = [
    "There is a cat on the mat.",
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "The quick brown fox jumps over the lazy dog",
    "hello there general kenobi",
    "The weather today is sunny",
    "the runner runs quick\nto a large house on a hill",
]
REFS2 = [
    "A cat was sitting on the mat.",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
    "A fast brown fox leaps over a lazy dog",
    "Hi there, General Kenobi.",
    "Nothing is shared here",
    "runners run to the house on the hill",
]


def mt_lines(shared_data: Path, n: int = 300) -> tuple[list[str], list[str], list[str]]:
    base = shared_data / "eval" / "mt" / "wmt17_en_de"
    systems = sorted((base / "systems").glob("*.de"))
    ref = (base / "newstest2017-ende.ref.de").read_text(encoding="utf-8").splitlines()[:n]
    a = systems[0].read_text(encoding="utf-8").splitlines()[:n]
    b = systems[1].read_text(encoding="utf-8").splitlines()[:n]
    return a, b, ref


# ------------------------------------------------------------------------------------------------ BLEU/chrF

@pytest.mark.parametrize("opts", [{}, {"tokenize": "intl", "lowercase": True}, {"smooth_method": "floor"},
                                  {"tokenize": "char", "smooth_method": "add-k", "smooth_value": 1}])
def test_bleu_matches_sacrebleu(opts):
    sacrebleu = pytest.importorskip("sacrebleu")
    ours = compute_metric("bleu", HYPS, [[a, b] for a, b in zip(REFS, REFS2)], **opts)
    ref = sacrebleu.corpus_bleu(HYPS, [REFS, REFS2], **opts)
    assert ours.score == pytest.approx(ref.score, abs=1e-9)
    sent = [sacrebleu.sentence_bleu(h, [a, b], **opts).score for h, a, b in zip(HYPS, REFS, REFS2)]
    np.testing.assert_allclose(ours.per_item, sent, atol=1e-9)
    assert ours.details["bp"] == pytest.approx(ref.bp)


def test_bleu_chrf_on_wmt_system(shared_data):
    sacrebleu = pytest.importorskip("sacrebleu")
    a, _, ref = mt_lines(shared_data)
    assert compute_metric("bleu", a, ref).score == pytest.approx(sacrebleu.corpus_bleu(a, [ref]).score, abs=1e-9)
    assert compute_metric("chrf", a, ref).score == pytest.approx(sacrebleu.corpus_chrf(a, [ref]).score, abs=1e-9)
    chrfpp = sacrebleu.corpus_chrf(a, [ref], word_order=2).score
    assert compute_metric("chrf++", a, ref).score == pytest.approx(chrfpp, abs=1e-9)


def test_bleu_variable_reference_counts():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = [[REFS[0], REFS2[0]], [REFS[1]], [REFS[2], REFS2[2]]]
    ours = compute_metric("bleu", HYPS[:3], refs).score
    expected = sacrebleu.corpus_bleu(HYPS[:3], [[r[0] for r in refs], [REFS2[0], None, REFS2[2]]]).score
    assert ours == pytest.approx(expected, abs=1e-9)


def test_chrf_sentence_and_corpus():
    sacrebleu = pytest.importorskip("sacrebleu")
    ours = compute_metric("chrf", HYPS, REFS, lowercase=True, beta=3)
    ref = sacrebleu.metrics.CHRF(lowercase=True, beta=3)
    assert ours.score == pytest.approx(ref.corpus_score(HYPS, [REFS]).score, abs=1e-9)
    sent = [ref.sentence_score(h, [r]).score for h, r in zip(HYPS, REFS)]
    np.testing.assert_allclose(ours.per_item, sent, atol=1e-9)


def test_bleu_bad_option():
    with pytest.raises(ConfigError, match="bleu"):
        compute_metric("bleu", HYPS, REFS, tokenize="no-such-tokenizer")
    with pytest.raises(ConfigError, match="unknown option"):
        compute_metric("bleu", HYPS, REFS, smoothing="exp")


# ---------------------------------------------------------------------------------------------------- ROUGE

@pytest.mark.parametrize("stem", [False, True])
def test_rouge_matches_rouge_score(stem):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
    ref = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    multi = [scorer.score_multi([a, b], h) for h, a, b in zip(HYPS, REFS, REFS2)]
    for t in types:
        ours = compute_metric(t, HYPS, REFS, use_stemmer=stem)
        np.testing.assert_allclose(ours.per_item, [s[t].fmeasure for s in ref], atol=1e-12)
        np.testing.assert_allclose(ours.details["per_item_recall"], [s[t].recall for s in ref], atol=1e-12)
        assert ours.score == pytest.approx(np.mean([s[t].fmeasure for s in ref]))
        ours_multi = compute_metric(t, HYPS, [[a, b] for a, b in zip(REFS, REFS2)], use_stemmer=stem)
        np.testing.assert_allclose(ours_multi.per_item, [s[t].fmeasure for s in multi], atol=1e-12)


def test_rouge_reference_testdata(shared_data):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    base = shared_data / "eval" / "reference_tests" / "rouge_score" / "testdata"
    targets = (base / "target.txt").read_text(encoding="utf-8").splitlines()
    preds = (base / "prediction.txt").read_text(encoding="utf-8").splitlines()
    ours = compute_metric("rouge1", preds, targets, use_stemmer=True)
    assert ours.per_item[0] == pytest.approx(0.51163, abs=1e-5)  # the value rouge-score's own test asserts
    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeL"])
    for t in ("rouge2", "rougeL"):
        expected = [scorer.score(r, p)[t].fmeasure for p, r in zip(preds, targets)]
        np.testing.assert_allclose(compute_metric(t, preds, targets).per_item, expected, atol=1e-12)


def test_rouge_summaries_from_summeval(shared_data):
    """Long multi-sentence texts, rougeLsum with newline-split sentences, stemming on."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    import json

    rows = [json.loads(line) for line in (shared_data / "eval" / "summeval.jsonl").open(encoding="utf-8")][:40:2]
    preds = [re.sub(r"(?<=[.!?]) ", "\n", r["summary"]) for r in rows]
    refs = [re.sub(r"(?<=[.!?]) ", "\n", " ".join(r["article"].split()[:80])) for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = [scorer.score(r, p)["rougeLsum"].fmeasure for p, r in zip(preds, refs)]
    np.testing.assert_allclose(compute_metric("rougeLsum", preds, refs, use_stemmer=True).per_item, expected,
                               atol=1e-12)


# --------------------------------------------------------------------------------------------------- METEOR

def _wordnet_or_skip():
    from lmstack.eval.metrics.wordnet import source_dir

    if not (source_dir() / "data.noun").is_file():
        pytest.skip(f"WordNet not found at {source_dir()}: apt-get install -y wordnet-base wordnet-sense-index")
    from lmstack.eval.metrics.wordnet import load_wordnet

    return load_wordnet()


def test_meteor_matches_nltk_reference_value():
    wn = _wordnet_or_skip()
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = HYPS[1].rstrip("."), REFS[1].rstrip(".")
    assert compute_metric("meteor", [hyp], [ref]).score == pytest.approx(0.6944444444444445, abs=1e-12)
    assert meteor_score([ref.split()], hyp.split(), wordnet=wn) == pytest.approx(0.6944444444444445, abs=1e-12)


def test_meteor_matches_nltk(shared_data):
    wn = _wordnet_or_skip()
    from nltk.translate.meteor_score import meteor_score

    base = shared_data / "eval" / "mt" / "ted_sl_en"
    hyps = (base / "ted.sys1.detok.en").read_text(encoding="utf-8").splitlines()[:200] + HYPS
    refs = (base / "ted.ref.detok.en").read_text(encoding="utf-8").splitlines()[:200] + REFS
    refs2 = (base / "ted.sys2.detok.en").read_text(encoding="utf-8").splitlines()[:200] + REFS2
    for tokenize, split in (("whitespace", str.split), ("regex", lambda t: re.findall(r"\w+|[^\w\s]", t))):
        ours = compute_metric("meteor", hyps, [[a, b] for a, b in zip(refs, refs2)], tokenize=tokenize).per_item
        expected = [meteor_score([split(a), split(b)], split(h), wordnet=wn) for h, a, b in zip(hyps, refs, refs2)]
        np.testing.assert_allclose(ours, expected, atol=1e-12)
    # the synonym stage matters on this data (otherwise the test would not check it)
    no_syn = compute_metric("meteor", hyps, refs, stages=["exact", "stem"]).score
    assert no_syn < compute_metric("meteor", hyps, refs).score


def test_missing_wordnet_names_the_fix(tmp_path, monkeypatch):
    from lmstack.eval.metrics.wordnet import build_wordnet

    monkeypatch.setenv("LMSTACK_WORDNET", str(tmp_path / "nowhere"))
    with pytest.raises(LmstackError, match="apt-get install -y wordnet-base wordnet-sense-index"):
        build_wordnet(data_dir=tmp_path / "nltk_data")


def test_lexnames_match_the_man_page():
    from lmstack.eval.metrics.wordnet import lexnames_text

    lines = lexnames_text().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[44] == "44\tadj.ppl\t3"
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not man.is_file():
        pytest.skip("lexnames(5WN) man page not installed")
    table = re.findall(r"^(\d\d)\t(\S+)\s*\t", gzip.open(man, "rt").read(), flags=re.M)
    assert [(n, name) for n, name, _ in (line.split("\t") for line in lines)] == table


# ---------------------------------------------------------------------------------------------- Levenshtein

def test_levenshtein_matches_rapidfuzz():
    rf = pytest.importorskip("rapidfuzz.distance")
    rng = random.Random(0)
    for _ in range(400):
        a = "".join(rng.choice("abcde ") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abcdef ") for _ in range(rng.randint(0, 150)))
        assert levenshtein_distance(a, b) == rf.Levenshtein.distance(a, b)
    ours = compute_metric("levenshtein", HYPS, REFS, engine="python")
    assert ours.per_item == compute_metric("levenshtein", HYPS, REFS).per_item   # the rapidfuzz engine
    for level in ("char", "token"):
        fast = compute_metric("levenshtein", HYPS, REFS, level=level, normalize=True).per_item
        assert fast == compute_metric("levenshtein", HYPS, REFS, level=level, normalize=True, engine="python").per_item
    assert ours.per_item == [float(rf.Levenshtein.distance(h, r)) for h, r in zip(HYPS, REFS)]
    norm = compute_metric("levenshtein", HYPS, REFS, normalize=True, engine="python")
    np.testing.assert_allclose(norm.per_item, [rf.Levenshtein.normalized_distance(h, r) for h, r in zip(HYPS, REFS)])
    tok = compute_metric("levenshtein", HYPS, REFS, level="token", normalize=True, engine="python")
    np.testing.assert_allclose(tok.per_item, [rf.Levenshtein.normalized_distance(h.split(), r.split())
                                              for h, r in zip(HYPS, REFS)])
    assert not ours.higher_is_better


def test_bit_parallel_lcs_matches_the_table():
    from lmstack.eval.metrics.ngram import _lcs_table, lcs_length

    rng = random.Random(2)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == (_lcs_table(a, b)[-1][-1] if a and b else 0)


def test_levenshtein_long_strings_beyond_one_machine_word():
    rf = pytest.importorskip("rapidfuzz.distance")
    rng = random.Random(1)
    a = "".join(rng.choice("acgt") for _ in range(3000))
    b = "".join(rng.choice("acgt") for _ in range(2500))
    assert levenshtein_distance(a, b) == rf.Levenshtein.distance(a, b)


# -------------------------------------------------------------------------------------------------- inputs

def test_count_mismatch_is_a_clear_error():
    with pytest.raises(DataError, match="3 predictions but 2 references"):
        compute_metric("bleu", HYPS[:3], REFS[:2])


def test_empty_reference_is_an_error_and_empty_prediction_is_recorded():
    with pytest.raises(DataError, match=r"references\[1\] is empty"):
        compute_metric("rouge1", ["a b", "c d"], ["a b", "  "])
    result = compute_metric("rouge1", ["a b", ""], ["a b", "c d"])
    assert result.failures == [{"index": 1, "reason": "empty prediction"}]
    with pytest.raises(DataError, match="empty prediction"):
        compute_metric("chrf", ["a b", ""], ["a b", "c d"], on_empty="error")


def test_unknown_metric_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown metric 'blue'"):
        compute_metric("blue", HYPS, REFS)
    with pytest.raises(DataError, match="expected a list"):
        compute_metric("bleu", "one string", REFS)
    with pytest.raises(DataError, match=r"predictions\[0\]"):
        compute_metric("bleu", [3], ["x"])


def test_registry_names():
    names = set(list_metrics())
    assert {"levenshtein", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "meteor"} <= names


def test_exact_match():
    r = compute_metric("exact_match", ["The Answer!", "42", "no"], [["answer", "the answer"], "42.", "yes"])
    assert r.per_item == [1.0, 1.0, 0.0] and r.score == pytest.approx(2 / 3)
