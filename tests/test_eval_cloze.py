"""Evaluation items built from held-out text (lmstack.eval.cloze)."""

from lmstack.eval.cloze import cloze_items, generation_pairs, split_at_space


def test_split_at_space_cuts_on_spaces():
    assert split_at_space("alpha beta gamma delta epsilon", 3, 12) == ("alpha", "beta gamma")
    assert split_at_space("nospace", 2, 5) is None


def test_cloze_items_hide_the_answer_among_other_documents():
    words = "red green blue cyan amber olive coral ivory slate pearl ochre azure".split()
    texts = [f"document {i:02d} opens here: {' '.join(words[i:] + words[:i])} and more" for i in range(12)]
    items = cloze_items(texts, 6, 20, 25, seed=0)
    assert len(items) == 6
    for i, item in enumerate(items):
        query, true = split_at_space(texts[i], 20, 25)
        assert item["query"] == query and item["choices"][item["gold"]] == true
        assert len(set(item["choices"])) == 4
    assert len({it["gold"] for it in items}) > 1  # the answer's position varies
    assert generation_pairs(texts, 3, 20, 25) == [split_at_space(t, 20, 25) for t in texts[:3]]
