"""Grounded extractive answers: citations, abstention, prompt, verification (hand-built cases)."""

from lmstack.rag.answer import IDK, answer, render_prompt, split_cited, verify
from lmstack.rag.chunk import Chunk
from lmstack.rag.index import Hit


def _hit(cid: str, text: str, score: float, source: str = "") -> Hit:
    return Hit(Chunk(f"{cid}#0", cid, source or f"{cid}.md", 0, len(text), text), score)


HITS = [
    _hit("cats", "Cats sleep a lot. A cat purrs when it is content.", 5.0),
    _hit("dogs", "Dogs bark at strangers. The dog wags its tail.", 4.0),
    _hit("fish", "Fish swim in water. Goldfish remember for months.", 3.0),
]


def test_citations_point_at_the_chunk_the_sentence_came_from():
    a = answer("why does a dog wag its tail", HITS, max_sentences=1)
    assert not a.abstained
    assert a.text == "The dog wags its tail. [1]"
    assert [(s.n, s.doc_id, s.chunk_id, s.score) for s in a.sources] == [(1, "dogs", "dogs#0", 4.0)]


def test_two_sentences_two_sources_numbered_in_retrieval_order():
    a = answer("goldfish remember months; cat purrs content", HITS, max_sentences=2)
    # "A cat purrs when it is content." shares 3 words at rank 0 (3/1); "Goldfish remember ..." 3 at rank 2 (3/3);
    # "Cats sleep a lot." none ("cats" is not "cat")
    assert a.text == "A cat purrs when it is content. [1] Goldfish remember for months. [2]"
    assert [s.doc_id for s in a.sources] == ["cats", "fish"]
    assert verify(a.text, a.sources).all_supported


def test_rank_weighting_prefers_the_better_ranked_chunk_on_equal_overlap():
    hits = [_hit("a", "The river is long.", 2.0), _hit("b", "The river is wide.", 9.0)]
    assert answer("river", hits, max_sentences=1).sources[0].doc_id == "a"  # rank, not the score, weights


def test_abstains_below_min_score_with_the_reason():
    a = answer("why does a dog wag its tail", [_hit("x", "The dog wags.", 0.8)], min_score=2.0)
    assert a.abstained and a.text == IDK and a.sources == []
    assert a.reason == "I don't know: the best retrieval score 0.8 is below min_score 2"


def test_abstains_when_no_sentence_shares_a_content_word():
    a = answer("quantum chromodynamics", HITS)
    assert a.abstained and a.reason == "I don't know: no sentence shares a content word with the question"
    assert answer("the of and", HITS).reason == "I don't know: the question has no content word"
    assert answer("dogs", []).reason == "I don't know: nothing was retrieved"


def test_render_prompt_numbers_sources_in_rank_order():
    p = render_prompt("Do dogs bark?", HITS[:2])
    assert p.index("[1] (cats.md)\nCats sleep a lot.") < p.index("[2] (dogs.md)\nDogs bark at strangers.")
    assert p.endswith("Question: Do dogs bark?\nAnswer:")
    assert IDK in p


def test_verify_flags_a_sentence_with_the_wrong_citation():
    text = "Dogs bark at strangers. [1] Cats sleep a lot. [1]"
    v = verify(text, HITS[:2][::-1])  # [1] = dogs, [2] = cats: the second sentence cites the wrong chunk
    assert [c.supported for c in v.checks] == [True, False]
    assert v.checks[0].score == 100.0
    assert v.supported_text == "Dogs bark at strangers. [1]"
    assert not v.all_supported


def test_verify_fuzzy_match_citation_out_of_range_and_missing_citation():
    v = verify("Dogs bark at the strangers [1] Fish swim. [3] Unsourced claim.", HITS[1:2])
    assert v.checks[0].supported and 90 <= v.checks[0].score < 100  # one inserted word: fuzzy, not exact
    assert not v.checks[1].supported and v.checks[1].why == "cites [3] but there are 1 sources"
    assert not v.checks[2].supported and v.checks[2].why == "no citation"


def test_split_cited_reads_several_citations():
    assert split_cited("A b. [1][2] C d. [3]") == [("A b.", [1, 2]), ("C d.", [3])]


def test_verify_flags_a_near_duplicate_that_differs_in_key_words():
    chunk = "The alpha0 bravo0 charlie0 delta0 parser reads input."
    v = verify("The alpha7 bravo7 charlie7 delta7 parser reads input. [1]", [chunk])
    assert not v.checks[0].supported and v.checks[0].score == 0.0  # 3 of 7 content words in the chunk
    assert verify("The alpha7 bravo7 charlie7 delta7 parser reads input. [1]", [chunk], min_coverage=0.0
                  ).checks[0].supported  # what a character match alone would say
