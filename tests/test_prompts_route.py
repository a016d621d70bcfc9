"""Routing decisions: rules (regex, metadata, length) in order, the embedding classifier (centroid, logistic
regression against scikit-learn), the default, the JSONL log, and config errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from lmstack.errors import ConfigError, LmstackError
from lmstack.prompts.route import EmbeddingClassifier, Route, Router, Rule, router_from_dict

EXAMPLES = {
    "billing": ["my invoice is wrong", "refund my payment", "charged twice on my card", "update billing address"],
    "tech": ["the app crashes on start", "error when I log in", "the page will not load", "reset my password"],
}
TEXTS = [t for k in sorted(EXAMPLES) for t in EXAMPLES[k]]
LABELS = [k for k in sorted(EXAMPLES) for _ in EXAMPLES[k]]


def bag_of_words(texts):
    """A deterministic stand-in for a sentence encoder: hashed word counts."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
    return out


SMALL, CODER, BIG = Route("runs/small", "qa@production"), Route("runs/coder", "code@production"), Route("big", "qa@3")


def rules():
    return [Rule("code", CODER, regex=r"```|\bdef\b"), Rule("vip", BIG, metadata={"tier": ["gold", "platinum"]}),
            Rule("long", BIG, min_length=50), Rule("short-en", SMALL, metadata={"lang": "en"}, max_length=5)]


def test_rules_in_order_with_reasons():
    r = Router(default=SMALL, rules=rules())
    d = r.decide("please fix def f(): pass", {"tier": "gold"})        # code comes before vip
    assert (d.route, d.source, d.rule) == (CODER, "rule", "code")
    assert d.reason == "rule 'code': regex '```|\\\\bdef\\\\b' matched 'def'"
    d = r.decide("hello", {"tier": "platinum"})
    assert (d.route, d.reason) == (BIG, "rule 'vip': tier='platinum'")
    assert r.decide("x" * 50).reason == "rule 'long': length 50 >= 50"
    assert r.decide("hi", {"lang": "en"}).reason == "rule 'short-en': lang='en', length 2 <= 5"
    assert r.decide("hi there", {"lang": "en"}).source == "default"          # every condition must hold
    d = r.decide("hello", {"tier": "free"})
    assert (d.route, d.source, d.reason) == (SMALL, "default", "no rule matched")


@pytest.mark.parametrize("kind", ["centroid", "logistic"])
def test_classifier_routes_by_label_and_confidence(kind):
    clf = EmbeddingClassifier(bag_of_words, kind=kind).fit(TEXTS, LABELS)
    assert [label for label, _ in clf.predict(["refund my invoice", "app crashes when I log in"])] == \
        ["billing", "tech"]
    billing, tech = Route("runs/small", "billing@production"), Route("runs/small", "tech@production")
    r = Router(default=SMALL, rules=rules(), classifier=clf, routes={"billing": billing, "tech": tech},
               min_confidence=0.3)
    d = r.decide("refund my invoice")
    assert (d.route, d.source, d.label) == (billing, "classifier", "billing") and d.confidence >= 0.3
    assert d.reason.startswith("classifier: 'billing' (")
    assert r.decide("def refund(): pass").source == "rule"                  # rules come first
    d = Router(default=SMALL, classifier=clf, routes={"billing": billing, "tech": tech},
               min_confidence=1.01).decide("refund my invoice")
    assert (d.route, d.source, d.label) == (SMALL, "default", "billing")
    assert "below min_confidence 1.01" in d.reason


def test_centroid_is_the_nearest_normalised_mean():
    clf = EmbeddingClassifier(bag_of_words, kind="centroid").fit(TEXTS, LABELS)
    x = bag_of_words(["refund my invoice"])[0]
    x = x / np.linalg.norm(x)
    cos = {}
    for label, examples in EXAMPLES.items():
        v = bag_of_words(examples)
        c = (v / np.linalg.norm(v, axis=1, keepdims=True)).mean(axis=0)
        cos[label] = float(x @ (c / np.linalg.norm(c)))
    assert clf.predict(["refund my invoice"])[0] == pytest.approx(("billing", cos["billing"]))
    assert clf.scores(["refund my invoice"])[0] == pytest.approx([cos["billing"], cos["tech"]])


def test_logistic_matches_sklearn():
    lm = pytest.importorskip("sklearn.linear_model")
    # three labels: sklearn's multinomial model has one weight vector per class, as ours does
    texts = TEXTS + ["buy the pro plan", "a quote for 50 seats", "talk to sales about pricing"]
    labels = LABELS + ["sales"] * 3
    l2 = 0.05
    ours = EmbeddingClassifier(bag_of_words, kind="logistic", l2=l2, max_iter=20000, tol=1e-14).fit(texts, labels)
    x = bag_of_words(texts)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = lm.LogisticRegression(C=1 / (len(texts) * l2), tol=1e-10, max_iter=10000).fit(x, labels)
    assert list(ref.classes_) == ours.labels
    probe = ["refund my invoice", "app crashes", "pricing for my plan"]
    q = bag_of_words(probe)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    assert ours.scores(probe) == pytest.approx(ref.predict_proba(q), abs=2e-4)


def test_decisions_are_logged_as_jsonl(tmp_path):
    log = tmp_path / "route.jsonl"
    r = Router(default=SMALL, rules=rules(), log_path=log)
    r.route("def x(): pass", {"user": 7})
    r.route("hello")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(row["source"], row["model"], row["prompt"], row["rule"]) for row in rows] == [
        ("rule", "runs/coder", "code@production", "code"), ("default", "runs/small", "qa@production", None)]
    assert rows[0]["request_sha256"] == hashlib.sha256(b"def x(): pass").hexdigest() and "text" not in rows[0]
    assert rows[0]["metadata"] == {"user": 7} and rows[0]["length"] == 13


def test_router_from_config():
    r = router_from_dict({
        "default": {"model": "runs/small", "prompt": "qa@production"},
        "rules": [{"name": "code", "regex": "```", "model": "runs/coder", "prompt": "code@production"}],
        "classifier": {"kind": "logistic", "min_confidence": 0.5, "examples": EXAMPLES,
                       "routes": {"billing": {"model": "runs/small", "prompt": "billing@2"},
                                  "tech": {"model": "runs/small", "prompt": "tech@staging"}}},
    }, embed=bag_of_words)
    assert r.decide("```py```").route == CODER
    assert r.decide("refund my payment please").route == Route("runs/small", "billing@2")


@pytest.mark.parametrize("make, message", [
    (lambda: Rule("r", SMALL), "give at least one of regex, metadata"),
    (lambda: Rule("r", SMALL, regex="("), "regex '\\(' does not compile"),
    (lambda: Rule("r", SMALL, max_length=-1), "max_length must be an integer >= 0"),
    (lambda: Router(SMALL, rules=[Rule("a", SMALL, regex="x"), Rule("a", SMALL, regex="y")]), "duplicate rule"),
    (lambda: Router(SMALL, classifier=EmbeddingClassifier(bag_of_words).fit(TEXTS, LABELS), routes={}),
     "classifier label\\(s\\) billing, tech have no route"),
    (lambda: EmbeddingClassifier(bag_of_words).fit(["a"], ["x"]), "needs at least two labels"),
    (lambda: router_from_dict({"default": {"model": "m", "prompt": "bad name"}}), "use letters"),
    (lambda: router_from_dict({"default": {"model": "m", "prompt": "p"}, "classifier": {}}),
     "pass an embedding function"),
])
def test_config_errors(make, message):
    with pytest.raises(LmstackError, match=message):
        make()


def test_with_minilm_sentence_embeddings():
    from lmstack.rag.embed import Embedder

    emb = Embedder(batch_size=8)
    try:
        assert emb.id
    except ConfigError as e:
        pytest.skip(str(e))
    clf = EmbeddingClassifier(emb.embed, kind="centroid").fit(TEXTS, LABELS)
    assert [label for label, _ in clf.predict(["I was billed the wrong amount", "the screen goes blank"])] == \
        ["billing", "tech"]
