"""Feedback payload checks, and the store's judgements exported as the DPO pairs and KTO rows that
``lmstack align dpo|kto`` read (loaded back with align's own readers). Both stores (tests/monitor_pg.py)."""

from __future__ import annotations

import json

import pytest

from lmstack.errors import LmstackError
from lmstack.monitor.feedback import kto_rows, parse_feedback, preference_pairs, prompt_of, write_alignment_data
from lmstack.monitor.store import Feedback, FieldError, Interaction, open_store

pytest_plugins = ("monitor_pg",)   # the store_url fixture: SQLite and PostgreSQL

T0 = 1_780_000_000.0


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def _log(store, i, prompt, output, model="m", messages=None):
    req = {"messages": messages} if messages is not None else {}
    return store.log(Interaction(id=f"i{i}", time=T0 + i, model=model, input=prompt, output=output, request=req))


@pytest.mark.parametrize("payload, field, message", [
    ([1, 2], None, "expected a JSON object"),
    ({"interaction_id": "a", "kind": "thumb", "value": 1, "score": 3}, "score", "unknown field 'score'"),
    ({"interaction_id": "a", "value": 1}, "kind", "'kind' is required"),
    ({"kind": "thumb", "value": 1}, "interaction_id", "'interaction_id' is required"),
    ({"interaction_id": "a", "kind": "thumb", "value": "up"}, "value", "'value' must be a number, got 'up'"),
    ({"interaction_id": "a", "kind": "thumb", "value": True}, "value", "'value' must be a number"),
    ({"interaction_id": "a", "kind": "thumb", "value": 0}, "value", "'value' of a thumb must be 1 (up) or -1"),
    ({"interaction_id": "a", "kind": "comment", "text": "  "}, "text", "'text' of a comment must be a non-empty"),
    ({"interaction_id": "a", "kind": "pairwise", "value": 1}, "other_id", "'other_id' of a pairwise choice"),
    ({"interaction_id": "a", "kind": "pairwise", "value": 1, "other_id": "a"}, "other_id", "must differ"),
    ({"interaction_id": "a", "kind": "thumb", "value": 1, "other_id": "b"}, "other_id", "pairwise choices only"),
    ({"interaction_id": 7, "kind": "thumb", "value": 1}, "interaction_id", "'interaction_id' must be the id"),
    ({"interaction_id": "a", "kind": "like", "value": 1}, "kind", "'kind' must be one of"),
    ({"interaction_id": "a", "kind": "comment", "text": "x" * 10_001}, "text", "longer than 10000 characters"),
    ({"interaction_id": "a", "kind": "thumb", "value": float("nan")}, "value", "'value' of a thumb must be 1"),
])
def test_malformed_payloads_name_the_field(payload, field, message):
    with pytest.raises(FieldError) as e:
        parse_feedback(payload)
    assert message in str(e.value) and e.value.field == field
    assert str(e.value).startswith("feedback: ")


def test_good_payloads_parse():
    assert parse_feedback({"interaction_id": "a", "kind": "thumb", "value": -1, "user": "u"}) == \
        Feedback("a", "thumb", value=-1, user="u")
    assert parse_feedback({"interaction_id": "a", "kind": "pairwise", "value": 0, "other_id": "b"}).other_id == "b"
    assert parse_feedback({"interaction_id": "a", "kind": "comment", "text": "too long"}).text == "too long"


def test_prompt_is_the_chat_when_the_request_had_one():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    row = Interaction(id="x", time=T0, model="m", input="hi", request={"messages": chat, "temperature": 0})
    assert prompt_of(row) == chat
    assert prompt_of(Interaction(id="x", time=T0, model="m", input="hi")) == "hi"
    odd = [{"role": "tool", "content": "42"}]   # a role align cannot read: the input text instead
    assert prompt_of(Interaction(id="x", time=T0, model="m", input="hi", request={"messages": odd})) == "hi"


def test_pairwise_votes_become_pairs_by_their_net(store):
    a, b = _log(store, 1, "q1", "good answer"), _log(store, 2, "q1", "bad answer", model="m2")
    c, d = _log(store, 3, "q2", "left"), _log(store, 4, "q2", "right")
    e, f = _log(store, 5, "q3", "same"), _log(store, 6, "q3", "same ")
    store.add_feedback(Feedback(a, "pairwise", other_id=b, value=1))
    store.add_feedback(Feedback(b, "pairwise", other_id=a, value=-1))    # the same preference, other way round
    store.add_feedback(Feedback(b, "pairwise", other_id=a, value=1))     # one dissent: net still a
    store.add_feedback(Feedback(c, "pairwise", other_id=d, value=1))
    store.add_feedback(Feedback(d, "pairwise", other_id=c, value=1))     # an even split: no pair
    store.add_feedback(Feedback(e, "pairwise", other_id=f, value=1))     # the same text: no pair
    store.add_feedback(Feedback(a, "pairwise", other_id=b, value=0))     # a tie adds nothing
    assert preference_pairs(store) == [{"prompt": "q1", "chosen": "good answer", "rejected": "bad answer",
                                        "chosen_id": a, "rejected_id": b, "source": "pairwise"}]


def test_thumbs_make_pairs_and_kto_labels(store):
    chat = [{"role": "user", "content": "name a colour"}]
    up1 = _log(store, 1, "name a colour", "blue", messages=chat)
    down1 = _log(store, 2, "name a colour", "I will not.", messages=chat)
    up2 = _log(store, 3, "name a colour", "red", messages=chat)
    lone = _log(store, 4, "another", "no partner")
    mixed = _log(store, 5, "name a colour", "green", messages=chat)
    for i, v in [(up1, 1), (down1, -1), (up2, 1), (up2, 1), (up2, -1), (lone, 1), (mixed, 1), (mixed, -1)]:
        store.add_feedback(Feedback(i, "thumb", value=v))
    store.add_feedback(Feedback(down1, "comment", text="refused"))
    pairs = preference_pairs(store)
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == [("blue", "I will not.", "thumbs"),
                                                                          ("red", "I will not.", "thumbs")]
    assert pairs[0]["prompt"] == chat
    assert kto_rows(store) == [
        {"prompt": chat, "completion": "blue", "label": True, "id": up1},
        {"prompt": chat, "completion": "I will not.", "label": False, "id": down1},
        {"prompt": chat, "completion": "red", "label": True, "id": up2},
        {"prompt": "another", "completion": "no partner", "label": True, "id": lone}]
    assert preference_pairs(store, model="other") == [] and kto_rows(store, since=T0 + 10 ** 9) == []


def test_a_users_latest_judgement_replaces_their_earlier_one(store):
    a, b = _log(store, 1, "q", "first"), _log(store, 2, "q", "second")
    store.add_feedback(Feedback(a, "thumb", value=1, user="ann", time=T0 + 10))
    store.add_feedback(Feedback(a, "thumb", value=-1, user="ann", time=T0 + 11))   # ann changed her mind
    store.add_feedback(Feedback(b, "thumb", value=1, time=T0 + 12))                # anonymous: both count
    store.add_feedback(Feedback(b, "thumb", value=1, time=T0 + 13))
    assert [(r["completion"], r["label"]) for r in kto_rows(store)] == [("first", False), ("second", True)]
    store.add_feedback(Feedback(a, "pairwise", other_id=b, value=1, user="bob", time=T0 + 14))
    store.add_feedback(Feedback(b, "pairwise", other_id=a, value=0, user="bob", time=T0 + 15))   # now a tie
    assert [p["source"] for p in preference_pairs(store)] == ["thumbs"]
    assert preference_pairs(store)[0]["chosen"] == "second"


def test_openai_text_parts_are_read_as_the_message_text():
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    row = Interaction(id="x", time=T0, model="m", input="hello", request={"messages": parts})
    assert prompt_of(row) == [{"role": "user", "content": "hello"}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert prompt_of(Interaction(id="x", time=T0, model="m", input="look", request={"messages": image})) == "look"


def test_a_pair_from_both_sources_is_written_once(store):
    a, b = _log(store, 1, "q", "yes"), _log(store, 2, "q", "no")
    store.add_feedback(Feedback(a, "pairwise", other_id=b, value=1))
    store.add_feedback(Feedback(a, "thumb", value=1))
    store.add_feedback(Feedback(b, "thumb", value=-1))
    assert [p["source"] for p in preference_pairs(store)] == ["pairwise"]


def test_exported_files_load_with_aligns_readers(store, tmp_path):
    from lmstack.align.data import load_pairs, load_unpaired, row_to_pair, row_to_unpaired
    from lmstack.sources import iter_rows
    from lmstack.tokenizer import train_bpe

    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "how are you"}]
    ids = [_log(store, k, "how are you", out, messages=chat) for k, out in
           enumerate(["fine thanks", "go away", "very well", "whatever"])]
    store.add_feedback(Feedback(ids[0], "pairwise", other_id=ids[1], value=1))
    store.add_feedback(Feedback(ids[2], "thumb", value=1))
    store.add_feedback(Feedback(ids[3], "thumb", value=-1))
    counts = write_alignment_data(store, dpo=tmp_path / "dpo.jsonl", kto=tmp_path / "kto.jsonl")
    assert counts == {"dpo": 2, "kto": 2}
    pairs = [row_to_pair(r, w) for w, r in iter_rows(tmp_path / "dpo.jsonl")]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(chat, "fine thanks", "go away"),
                                                                 (chat, "very well", "whatever")]
    unpaired = [row_to_unpaired(r, w) for w, r in iter_rows(tmp_path / "kto.jsonl")]
    assert [(u.prompt, u.completion, u.label) for u in unpaired] == [(chat, "very well", True),
                                                                     (chat, "whatever", False)]
    tok = train_bpe(["be kind how are you fine thanks go away very well whatever"] * 4, 300)
    encoded, stats = load_pairs([tmp_path / "dpo.jsonl"], tok, 128)
    assert stats["pairs"] == 2 and len(encoded) == 2
    _, kstats = load_unpaired([tmp_path / "kto.jsonl"], tok, 128)
    assert kstats["examples"] == 2 and kstats["desirable"] == 1
    first = json.loads((tmp_path / "dpo.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "chosen_id", "rejected_id", "source"}


def test_write_alignment_data_needs_an_output(store):
    with pytest.raises(LmstackError, match="give a DPO output path, a KTO output path, or both"):
        write_alignment_data(store)
