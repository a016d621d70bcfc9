"""Verifiable rewards: numeric extraction (strict and lenient), the reasoning format, code in the sandbox,
reward-model scores, weighted sums, and failing reward functions counted instead of poisoning the loss."""

from __future__ import annotations

import json
import math

import pytest

from lmstack.align.rewards import (
    RewardStats,
    answer_of,
    code_reward,
    combine,
    correct_lenient,
    correct_strict,
    default_rewards,
    exact_match,
    extract_lenient,
    extract_strict,
    format_reward,
    gsm8k_answer,
    reward_model_reward,
    score_one,
)


@pytest.mark.parametrize("text, strict, lenient", [
    ("<think>3+4=7</think>\n#### 7", "7", "7"),
    ("#### 1,234", "1234", "1234"),
    ("so the total is\n#### $1,234.", "1234", "1234"),
    ("#### -5", "-5", "-5"),
    ("#### 2.50", "2.5", "2.5"),
    ("#### 18.00\n", "18", "18"),
    ("The answer is $1,234.", None, "1234"),
    ("I think it is 12, or maybe -3.5.", None, "-3.5"),
    ("#### 7 because 3+4", None, "4"),          # text after the answer: not the required format
    ("no digits here", None, None),
    ("#### \u22123", "-3", "-3"),               # a Unicode minus sign
])
def test_strict_and_lenient_extraction(text, strict, lenient):
    assert extract_strict(text) == strict
    assert extract_lenient(text) == lenient


def test_every_gsm8k_test_answer_parses(shared_data):
    path = shared_data / "reasoning" / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) > 1000
    for row in rows:
        raw = row["answer"].split("####")[-1].strip()
        want = str(int(raw.replace(",", ""))) if raw.replace(",", "").lstrip("-").isdigit() else raw
        # the reference solution itself is a correct response under both extractions
        assert gsm8k_answer(row["answer"]) == want, row["answer"][-40:]
        assert extract_strict(row["answer"]) == want
        assert extract_lenient(row["answer"]) == want
        item = {"answer": row["answer"]}
        assert correct_strict([f"<think>x</think>\n#### {raw}"], [item]) == [1.0]
        assert correct_lenient([f"I get {raw}."], [item]) == [1.0]


def test_answer_of_numbers_and_solutions():
    assert answer_of({"answer": 12}) == "12"
    assert answer_of({"answer": "3.0"}) == "3"
    assert answer_of({"answer": "Work.\n#### 1,000"}) == "1000"
    with pytest.raises(ValueError, match="no '#### N'"):
        gsm8k_answer("no final answer")


def test_format_reward_template():
    assert format_reward(["<think>2 + 2 = 4</think>\n#### 4", "  <think>\nsteps\n</think>  ####  -1.5  "]) == [1.0, 1.0]
    assert format_reward(["<think>x</think> the answer is 4"]) == [0.5]      # thought, no answer line
    assert format_reward(["#### 4", "<think></think>#### 4", "<think>x</think>#### 4 extra"]) == [0.0, 0.0, 0.5]


def test_exact_match_reports_both():
    items = [{"answer": "7"}, {"answer": "7"}, {"answer": "7"}]
    em = exact_match(["#### 7", "it is 7", "8"], items)
    assert em == {"exact_match_strict": pytest.approx(1 / 3), "exact_match_lenient": pytest.approx(2 / 3)}


def test_code_reward_runs_tests_in_the_sandbox():
    fn = code_reward(timeout_s=10)
    item = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    good = "<think>add them</think>\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    assert fn([good, bad], [item, item]) == [1.0, 0.0]


def test_reward_model_and_weighted_sum():
    class Scorer:
        def score(self, prompts, responses):
            return [len(p) + 0.5 * len(r) for p, r in zip(prompts, responses)]

    items = [{"prompt": "ab", "answer": "4"}, {"prompt": "abcd", "answer": "5"}]
    responses = ["<think>2+2</think>\n#### 4", "#### 4"]
    total, parts = combine([(correct_strict, 1.0), (format_reward, 0.5), (reward_model_reward(Scorer()), 0.1)],
                           responses, items)
    assert parts["correct_strict"] == [1.0, 0.0] and parts["format_reward"] == [1.0, 0.0]
    assert parts["reward_model"] == [2 + 0.5 * len(responses[0]), 4 + 0.5 * len(responses[1])]
    assert total == pytest.approx([1.0 + 0.5 + 0.1 * parts["reward_model"][0], 0.1 * parts["reward_model"][1]])
    # a bare callable works as a scorer too
    plain = reward_model_reward(lambda prompts, responses: [1.0] * len(prompts))
    assert plain(responses, items) == [1.0, 1.0]
    assert [fn.__name__ for fn, _ in default_rewards(1.0, 0.5, 0.1)] == ["correct_strict", "correct_lenient",
                                                                        "format_reward"]


def test_raising_and_nan_rewards_are_counted_and_isolated():
    def flaky(responses, items):          # raises on one sample only: the others keep their scores
        if any("boom" in r for r in responses):
            raise RuntimeError("judge crashed")
        return [1.0] * len(responses)

    def nan_on_odd(responses, items):
        return [math.nan if len(r) % 2 else 2.0 for r in responses]

    stats = RewardStats()
    responses = ["ok", "boom", "fine", "odd"]
    items = [{}] * 4
    assert score_one(flaky, responses, items, stats) == [1.0, pytest.approx(math.nan, nan_ok=True), 1.0, 1.0]
    total, _ = combine([(nan_on_odd, 1.0), (flaky, 1.0)], responses, items, stats)
    assert [math.isnan(t) for t in total] == [False, True, False, True]
    assert stats.failed == {"flaky": 2, "nan_on_odd": 1}
    assert stats.first_error["flaky"] == "RuntimeError: judge crashed"
    line = stats.summary()
    assert line.startswith("rewards: flaky failed on 2 of 4 samples (first: RuntimeError: judge crashed); "
                           "nan_on_odd failed on 1 of 4 samples (first: returned NaN/inf)")
    assert line.endswith("those samples got no gradient")

    def wrong_count(responses, items):
        return [1.0]

    stats = RewardStats()
    assert score_one(wrong_count, ["a", "b"], [{}, {}], stats) == [1.0, 1.0]   # per-sample retry succeeds
    assert stats.total_failed == 0
