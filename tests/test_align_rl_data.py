"""Synthetic arithmetic items: bounded running values, the one-step facts, and the held-out side kept apart."""

from __future__ import annotations

import itertools

import pytest

from lmstack.align.rl_data import arithmetic_facts, arithmetic_items
from lmstack.errors import ConfigError, DataError


def _running(question: str) -> list[int]:
    tokens = question.removeprefix("What is ").removesuffix("?").split()
    value, out = int(tokens[0]), []
    for op, t in zip(tokens[1::2], tokens[2::2]):
        value = value + int(t) if op == "+" else value - int(t)
        out.append(value)
    return out


def test_max_value_bounds_every_running_value_and_the_space_is_exact():
    items = arithmetic_items(400, split="train", n_terms=3, max_operand=9, max_value=9, heldout_fraction=0.25)
    assert all(0 <= v <= 9 for it in items for v in _running(it["question"]))
    assert all(int(it["answer"]) == _running(it["question"])[-1] for it in items)
    # 1,210 bounded 3-term questions exist; asking for more than one side holds is an error naming max_value
    space = sum(1 for a, b, c in itertools.product(range(10), repeat=3) for o1, o2 in itertools.product("+-", repeat=2)
                if 0 <= (x := a + b if o1 == "+" else a - b) <= 9 and 0 <= (x + c if o2 == "+" else x - c) <= 9)
    assert space == 1210
    with pytest.raises(DataError, match="max_value=9"):
        arithmetic_items(1210, split="train", n_terms=3, max_operand=9, max_value=9, heldout_fraction=0.25)


def test_facts_are_every_bounded_one_step_question_and_the_heldout_side_is_new():
    facts = arithmetic_facts(max_operand=9, ops=["+", "-"], max_value=9)
    assert len(facts) == 55 + 55 and len({f["question"] for f in facts}) == 110   # a+b<=9 and a-b>=0 pairs
    held = arithmetic_items(80, split="heldout", n_terms=3, max_operand=9, max_value=9, heldout_fraction=0.25)
    train = arithmetic_items(600, split="train", n_terms=3, max_operand=9, max_value=9, heldout_fraction=0.25)
    assert not {h["question"] for h in held} & {t["question"] for t in train}
    # every step of a held-out problem is a fact the warm-up trains on (the chain itself is new)
    known = {f["solution"].split("</think>")[0].removeprefix("<think>") for f in facts}
    for h in held:
        steps = h["solution"].split("</think>")[0].removeprefix("<think>").split(". ")
        assert all(s in known for s in steps)


def test_config_rejects_a_bad_bound():
    from lmstack.align.rl_config import ArithmeticConfig

    with pytest.raises(ConfigError, match="data.arithmetic.max_value"):
        ArithmeticConfig(max_value=0)


def test_all_items_extend_every_prefix_so_an_offset_gives_new_questions():
    kw = {"split": "train", "n_terms": 3, "max_operand": 9, "max_value": 9, "heldout_fraction": 0.25, "seed": 1337}
    every = arithmetic_items(None, **kw)
    assert [it["question"] for it in arithmetic_items(50, **kw)] == [it["question"] for it in every[:50]]
    held = arithmetic_items(None, **{**kw, "split": "heldout"})
    assert len(every) + len(held) == 1210          # the sampler finds the whole space, each side apart
    assert len({it["question"] for it in every}) == len(every)


def test_load_items_offset_skips_the_warmup_share():
    from lmstack.align.online import load_items
    from lmstack.align.rl_config import ArithmeticConfig, OnlineConfig, RLDataConfig

    arith = {"max_operand": 9, "n_terms": 3, "max_value": 9, "heldout_items": 5}
    cfg = OnlineConfig(base="x", data=RLDataConfig(heldout_fraction=0.25, arithmetic=ArithmeticConfig(
        train_items=40, train_offset=30, **arith)))
    train, held = load_items(cfg)
    assert len(held) == 5 and not {it["question"] for it in held} & {it["question"] for it in train}
    first = arithmetic_items(70, split="train", seed=cfg.seed, heldout_fraction=0.25, **{
        k: v for k, v in arith.items() if k != "heldout_items"})
    assert [it["question"] for it in train] == [it["question"] for it in first[30:]]
    with pytest.raises(ConfigError, match="data.arithmetic.train_offset"):
        ArithmeticConfig(train_offset=-1)
    too_many = OnlineConfig(base="x", data=RLDataConfig(heldout_fraction=0.25, arithmetic=ArithmeticConfig(
        train_items=1000, train_offset=300, **arith)))
    with pytest.raises(DataError, match=r"train_offset 300 \+ train_items 1000 .* set train_items <= \d+"):
        load_items(too_many)
