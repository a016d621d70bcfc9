"""Deduplication: exact copies, paraphrased near-copies, and distinct documents that must survive."""

from __future__ import annotations

import numpy as np
import pytest

from lmstack.data.clean import Reject
from lmstack.data.dedup import DedupConfig, ExactDedup, MinHasher, NearDedup, jaccard, lsh_params
from lmstack.errors import ConfigError

DOCS = [
    "Arctic terns travel farther than any other bird, flying from their breeding grounds in the Arctic to the "
    "Antarctic and back every year. Researchers attached small geolocators to the birds and found that a "
    "single tern can cover more than seventy thousand kilometres in a year, following the prevailing winds "
    "across the Atlantic before they return to the same colonies in spring.",
    "Bread rises because yeast eats the sugars in flour and releases carbon dioxide, which the gluten network "
    "traps in small pockets. A slow, cool fermentation gives the dough time to develop flavour, while a warm "
    "kitchen speeds everything up but leaves the loaf tasting flat. Bakers fold the dough every half hour to "
    "strengthen it before shaping.",
    "The first transatlantic telegraph cable was laid in 1858 and failed after three weeks, when an engineer "
    "applied too much voltage while trying to speed up the signal. A sturdier cable, laid by the Great "
    "Eastern in 1866, worked for years and cut the time for news to cross the ocean from ten days to a few "
    "minutes, changing trade and diplomacy.",
    "Glaciers move because ice deforms under its own weight and slides over meltwater at its base. In summer "
    "the extra water lubricates the bed and some glaciers double their speed, which is why scientists place "
    "pressure sensors in boreholes drilled through hundreds of metres of ice to follow the seasons beneath "
    "the surface of the ice sheet.",
    # shares a topic and many words with the terns text, but is a different document
    "Common swifts spend almost their whole lives in the air, eating, drinking and even sleeping on the wing. "
    "Young swifts that leave the nest may not land again for two or three years, until they are ready to "
    "breed, and ringing studies show that they winter in central Africa and return to Europe in May.",
]


def paraphrase(text: str) -> str:
    """A light rewrite: a few words swapped for synonyms, case and punctuation changed, a clause added."""
    out = (text.replace("travel", "fly").replace("small", "tiny").replace("releases", "gives off")
           .replace("failed", "broke").replace("move", "flow").replace("almost", "nearly"))
    return out.upper().replace(",", ";") + " Or so the story goes."


def test_exact_dedup_normalises_case_space_and_punctuation():
    step = ExactDedup()
    assert step(DOCS[0]) == DOCS[0]
    assert step("  " + DOCS[0].upper().replace(",", " ,") + "\n") == Reject("exact_duplicate")
    assert step(DOCS[1]) == DOCS[1]
    assert step(DOCS[0]) == Reject("exact_duplicate")
    assert (step.stats.clusters, step.stats.removed) == (1, 2)


def test_near_dedup_removes_paraphrases_and_keeps_distinct_documents():
    for d in DOCS:
        # the rewrite really is a near copy, and unrelated documents really are far apart
        assert 0.5 < jaccard(d, paraphrase(d)) < 1.0
    assert max(jaccard(a, b) for i, a in enumerate(DOCS) for b in DOCS[i + 1:]) < 0.1
    step = NearDedup(threshold=0.5, num_perm=128, ngram=5, seed=1)
    kept = [d for d in DOCS if step(d) == d]
    assert kept == DOCS
    results = [step(paraphrase(d)) for d in DOCS]
    assert results == [Reject("near_duplicate")] * len(DOCS)
    assert (step.stats.clusters, step.stats.removed) == (len(DOCS), len(DOCS))
    ex = step.stats.examples[0]
    assert ex["kept"].startswith("Arctic terns") and ex["removed"].startswith("ARCTIC TERNS")
    assert 0.5 <= ex["similarity"] <= 1.0


def test_near_dedup_clusters_several_copies_under_one_kept_document():
    step = NearDedup(threshold=0.5, seed=0, max_examples=10)
    assert step(DOCS[2]) == DOCS[2]
    copies = [paraphrase(DOCS[2]), DOCS[2] + " Reported by our correspondent.", paraphrase(DOCS[2]) + " Indeed."]
    assert [step(c) for c in copies] == [Reject("near_duplicate")] * 3
    assert (step.stats.clusters, step.stats.removed) == (1, 3)


def test_minhash_estimates_jaccard():
    hasher = MinHasher(num_perm=512, ngram=3, seed=0)
    a = " ".join(f"w{i}" for i in range(300))
    for cut in (60, 150, 240):  # b shares a prefix of `cut` words with a, then diverges
        b = " ".join(f"w{i}" for i in range(cut)) + " " + " ".join(f"v{i}" for i in range(300 - cut))
        true = jaccard(a, b, ngram=3)
        est = float(np.mean(hasher.signature(a) == hasher.signature(b)))
        # the estimate is a mean of 512 Bernoulli(J) draws: standard deviation <= 0.023
        assert abs(est - true) < 0.08, (cut, true, est)


def test_signatures_are_deterministic_and_order_free_over_shingles():
    a, b = MinHasher(64, 5, seed=3), MinHasher(64, 5, seed=3)
    assert np.array_equal(a.signature(DOCS[0]), b.signature(DOCS[0]))
    assert not np.array_equal(a.signature(DOCS[0]), MinHasher(64, 5, seed=4).signature(DOCS[0]))
    assert a.signature(DOCS[0]).dtype == np.uint32


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_bands_put_the_s_curve_knee_at_the_threshold(threshold):
    bands, rows = lsh_params(threshold, 128)
    assert bands * rows <= 128

    def p(s: float) -> float:
        return 1 - (1 - s ** rows) ** bands

    assert p(min(threshold + 0.15, 1.0)) > 0.9
    assert p(threshold - 0.25) < 0.1


def test_dedup_config_builds_steps_and_validates():
    steps = DedupConfig(threshold=0.8).make_steps()
    assert [s.name for s in steps] == ["exact_dedup", "near_dedup"]
    assert DedupConfig(near=False).make_steps()[0].name == "exact_dedup"
    with pytest.raises(ConfigError, match="threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="bands and rows"):
        DedupConfig(bands=4)
    with pytest.raises(ConfigError, match="exceeds num_perm"):
        NearDedup(num_perm=16, bands=5, rows=4)
