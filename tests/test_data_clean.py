"""Cleaning steps on crafted inputs: what each keeps, rewrites, or removes, and with which reason."""

from __future__ import annotations

import pytest

from lmstack.data.clean import (
    BookCleanup,
    BoilerplateLines,
    CleanConfig,
    CodeCleanup,
    HtmlToText,
    LanguageFilter,
    PiiMask,
    QualityFilter,
    Reject,
    UnicodeNormalize,
    apply_steps,
    build_steps,
    dehyphenate,
    identify_language,
    repetition_stats,
    strip_license_header,
)
from lmstack.data.sources import Document, html_to_text_basic, iter_source
from lmstack.errors import ConfigError, DataError

PROSE = (
    "Arctic terns travel farther than any other bird, flying from their breeding grounds in the Arctic to "
    "the Antarctic and back every year. Researchers attached small geolocators to the birds and found that "
    "a single tern can cover more than seventy thousand kilometres in a year, following the prevailing winds "
    "across the Atlantic. The birds stop to feed in rich waters off West Africa before splitting into two "
    "groups that follow different coasts south, and they return with the spring to the same colonies."
)

PROSE2 = (
    "Bread rises because yeast eats the sugars in flour and releases carbon dioxide, which the gluten network "
    "traps in small pockets. A slow, cool fermentation gives the dough time to develop flavour, while a warm "
    "kitchen speeds everything up but leaves the loaf tasting flat. Bakers fold the dough every half hour to "
    "strengthen it, then shape it gently so that the gas stays inside until the oven sets the crumb."
)

PAGE = f"""<!doctype html><html><head><title>Terns</title>
<style>body {{ color: red }} .menu {{ display: flex }}</style>
<script>var tracker = initTracking(); tracker.send("pageview");</script></head>
<body><header><div class="logo">Example News</div><nav><ul><li><a href="/">Home</a></li>
<li><a href="/world">World news</a></li><li><a href="/contact">Contact us</a></li></ul></nav></header>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies to continue.</div>
<main><article><h1>The long migration of arctic terns</h1>
<p>{PROSE[:230]}</p><p>{PROSE[230:]}</p></article></main>
<aside class="sidebar"><h3>Most read</h3><ul><li>Stock markets rally</li><li>Weather warning</li></ul></aside>
<footer><p>Copyright 2024 Example News Corporation. All rights reserved.</p>
<a href="/privacy">Privacy policy</a></footer></body></html>"""

BOILERPLATE_WORDS = ("initTracking", "Home", "Contact us", "cookies", "Most read", "Stock markets", "Copyright",
                     "Privacy policy", "color: red")


@pytest.mark.parametrize("engine", ["trafilatura", "basic"])
def test_html_keeps_the_article_and_drops_page_furniture(engine):
    out = HtmlToText(engine=engine)(PAGE)
    assert isinstance(out, str)
    assert "Arctic terns travel farther than any other bird" in out
    assert "return with the spring to the same colonies" in out
    for word in BOILERPLATE_WORDS:
        assert word not in out, (engine, word)


def test_html_without_main_text_is_removed_and_entities_decode_once():
    assert HtmlToText(engine="basic")("<html><body><nav><a href='/'>Home</a></nav><script>x()</script>"
                                      "</body></html>") == Reject("no_main_text")
    assert html_to_text_basic("<p>fish &amp; chips &amp;lt;3</p><br><p>two</p>") == "fish & chips &lt;3\ntwo"


def test_unicode_normalisation():
    step = UnicodeNormalize()
    # decomposed e + combining acute -> one code point; NBSP -> space; zero-width space and BOM removed;
    # CRLF -> LF; a bell character removed; runs of blank lines -> one; trailing spaces stripped
    text = "\ufeffCafe\u0301\u00a0bar\u200bbaz  \r\nnext\x07 line\n\n\n\n\nlast\u2028one"
    assert step(text) == "Café barbaz\nnext line\n\nlast\none"
    assert UnicodeNormalize(form="NFKC")("ﬁne ｆｕｌｌ") == "fine full"
    assert UnicodeNormalize()("ﬁne") == "ﬁne"  # NFC keeps compatibility characters


def test_boilerplate_lines_c4_rules():
    step = BoilerplateLines()
    text = ("A real sentence about rivers.\nPlease enable JavaScript to view this page.\n"
            "This site uses cookies to improve your experience.\nAnother sentence about lakes.\n"
            "Read our Privacy Policy and Terms of Use.")
    assert step(text) == "A real sentence about rivers.\nAnother sentence about lakes."
    assert step("Enable javascript.\nWe use cookies.") == Reject("only_boilerplate")
    for notice in ("By continuing you accept all cookies.", "Manage cookie preferences",
                   "Our site uses cookies to personalise content.", "Read about our use of cookies here."):
        assert step(notice) == Reject("only_boilerplate"), notice
    story = "Lily wanted to use the cookies for the party.\nMom said the cookies were hot."
    assert step(story) == story
    assert BoilerplateLines(javascript=False)("Enable javascript.") == "Enable javascript."


def _words(n: int, word: str = "water") -> str:
    return " ".join([word] * n)


QUALITY_CASES = {
    "lorem_ipsum": "Lorem ipsum dolor sit amet. " + PROSE,
    "too_few_words": "The terns fly south every year with the wind.",
    "mean_word_length": " ".join(["extraordinarilyunbelievable", "the", "and"] * 30),
    "symbol_ratio": PROSE + " " + " ".join(["#tag"] * 20),
    "bullet_lines": "\n".join(f"- the item number {i} of the list and more" for i in range(12)),
    "ellipsis_lines": "\n".join(f"The story of bird {i} and the sea goes on..." for i in range(8)) + "\n" + PROSE,
    "alpha_words": PROSE + " " + " ".join(str(1000 + i) for i in range(40)),
    "stop_words": " ".join(f"bird{i % 7} flies south quickly" for i in range(20)),
    "duplicate_lines": PROSE + "\n" + "\n".join(["Subscribe now for daily news."] * 10),
    "top_2gram": " ".join(["arctic terns"] * 30) + " " + PROSE,
    "duplicate_5gram": PROSE + " " + " ".join(f"the birds fly over the sea {w}" for w in
                                             ("north", "east", "south", "west", "again", "today")),
}


@pytest.mark.parametrize("reason", sorted(QUALITY_CASES))
def test_quality_rules_remove_with_their_reason(reason):
    assert QualityFilter().reason(QUALITY_CASES[reason]) == reason


def test_quality_keeps_ordinary_prose():
    step = QualityFilter()
    assert step(PROSE) == PROSE
    assert step.reason(PROSE + "\n\n" + PROSE2) is None
    # the same paragraph twice with two words changed is mostly repeated 5-grams
    assert step.reason(PROSE + "\n\n" + PROSE.replace("terns", "swifts")) == "duplicate_5gram"


def test_repetition_stats_match_hand_counts():
    # "a b a b a b": the top 2-gram "a b" occurs 3 times over 6 one-letter words -> 3 * 2 / 6 = 1.0
    assert repetition_stats("a b a b a b".split())["top_2"] == pytest.approx(1.0)
    # words 0..9 then 0..4 again: the repeated 5-gram covers the last 5 of 15 words
    words = [f"w{i}" for i in range(10)] + [f"w{i}" for i in range(5)]
    assert repetition_stats(words)["dup_5"] == pytest.approx(5 / 15)
    assert repetition_stats([f"w{i}" for i in range(20)])["dup_5"] == 0.0


def test_quality_config_is_validated():
    with pytest.raises(ConfigError, match="max_dup_ngram"):
        QualityFilter(max_dup_ngram=(0.1, 0.1))


def test_language_filter():
    step = LanguageFilter(languages=("en",))
    assert step(PROSE) == PROSE
    german = ("Die Küstenseeschwalbe legt jedes Jahr die längste Strecke aller Vögel zurück und fliegt von der "
              "Arktis bis in die Antarktis und wieder zurück.")
    french = ("La sterne arctique parcourt chaque année la plus longue distance de tous les oiseaux, de "
              "l'Arctique jusqu'à l'Antarctique et retour.")
    assert step(german) == Reject("language:de")
    assert step(french) == Reject("language:fr")
    assert LanguageFilter(languages=("en", "de"))(german) == german
    assert step(PROSE.upper()) == PROSE.upper()  # all-caps English is still English
    assert step("Too short to judge.") == "Too short to judge."  # under min_chars: left to the quality step


def test_language_id_matches_langid():
    from langid.langid import LanguageIdentifier, model

    reference = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    samples = [PROSE, PROSE2, "Die Küstenseeschwalbe fliegt jedes Jahr von der Arktis in die Antarktis.",
               "La sterne arctique parcourt chaque année la plus longue distance.", "def f(x): return x + 1",
               "Hola, ¿cómo estás? Muy bien, gracias.", "短い日本語の文章です。", "ok"]
    for text in samples:
        lang, prob = identify_language(text)
        ref_lang, ref_prob = reference.classify(text)
        assert lang == ref_lang and prob == pytest.approx(ref_prob, abs=1e-9), text


def test_pii_masking():
    step = PiiMask()
    text = ("Write to jane.doe+news@mail.example.co.uk or call +1 (555) 123-4567, 555-123-4567 or "
            "+44 20 7946 0958; the server is 192.168.10.254 and 2001:db8::8a2e:370:7334.")
    assert step(text) == ("Write to <EMAIL> or call <PHONE>, <PHONE> or <PHONE>; the server is <IP> and <IP>.")
    keep = ("On 2023-10-12 in 1984 the price was 1,000,000 dollars, Python 3.11.7 at 12:30:45, "
            "page 12-14, not an address 999.1.1.1 nor user@localhost.")
    assert step(keep) == keep
    assert PiiMask(phones=False, email_token="[email]")("a@b.org 555-123-4567") == "[email] 555-123-4567"


BOOK = """THE TIME MACHINE

The Time Traveller was expounding a recondite mat-
ter to us. His grey eyes shone and twinkled, and his usu-
ally pale face was flushed and animated.

12

THE TIME MACHINE   13

The fire burned brightly, and the soft radiance of the in-
candescent lights caught the bubbles. It was a well-
known fact, and a well-known story.

- 14 -

THE TIME MACHINE

"Yes."
"Yes."
"Yes."
CHAPTER IV
xiv
"""


def test_book_cleanup():
    out = BookCleanup()(BOOK)
    assert "THE TIME MACHINE" not in out              # running header (3 times, page numbers ignored)
    assert "12" not in out and "- 14 -" not in out and "xiv" not in out  # page numbers
    assert "recondite matter\nto us" in out            # hyphenation joined, the break moved after the word
    assert "his usually\npale face" in out
    assert "incandescent\nlights" in out
    assert "well-known\nfact" in out                   # a compound the book spells with a hyphen keeps it
    assert out.count('"Yes."') == 3                   # repeated dialogue is not a header
    assert "CHAPTER IV" in out


def test_dehyphenate_alone():
    assert dehyphenate("a beauti-\nful day") == "a beautiful\nday"
    assert dehyphenate("end of a para-\ngraph\nnext") == "end of a paragraph\nnext"


def test_code_cleanup():
    step = CodeCleanup()
    generated = "# Code generated by protoc-gen-go. DO NOT EDIT.\npackage main\n\nfunc main() {}\n"
    assert step(generated) == Reject("auto_generated")
    minified = "var a=1;" * 200
    assert step(minified) == Reject("minified")
    assert step("\n".join(["[[], [], {}], (()), |--|--| == ++ ;; :: 0"] * 20)) == Reject("low_alnum")
    licensed = ("#!/usr/bin/env python\n# Copyright 2024 Example Corp.\n# Licensed under the Apache License, "
                "Version 2.0.\n\nimport os\n\n\ndef main():\n    return os.getcwd()\n")
    assert step(licensed) == "#!/usr/bin/env python\nimport os\n\n\ndef main():\n    return os.getcwd()\n"
    c_code = "/*\n * SPDX-License-Identifier: MIT\n */\n#include <stdio.h>\nint main(void) { return 0; }\n"
    assert strip_license_header(c_code) == "#include <stdio.h>\nint main(void) { return 0; }\n"
    plain = "# compute the mean\ndef mean(xs):\n    return sum(xs) / len(xs)\n"
    assert step(plain) == plain  # a leading comment without license words stays


def test_apply_steps_counts_reasons_and_keeps_examples():
    config = CleanConfig()
    steps = build_steps(config, ["unicode", "quality", "language"])
    docs = [Document(PROSE, "s", "a.txt"), Document("too short", "s", "b.txt"),
            Document(PROSE.replace("terns", "terns\u00a0"), "s", "c.txt"),
            Document("Lorem ipsum " + PROSE, "s", "d.txt"), Document("tiny", "s", "e.txt")]
    stats = {}
    kept = list(apply_steps(docs, lambda d: steps, stats, max_examples=1))
    assert [d.origin for d in kept] == ["a.txt", "c.txt"]
    assert (stats["unicode"].docs_in, stats["unicode"].docs_out, stats["unicode"].modified) == (5, 5, 1)
    q = stats["quality"]
    assert (q.docs_in, q.docs_out) == (5, 2)
    assert dict(q.removed) == {"too_few_words": 2, "lorem_ipsum": 1}
    assert [e["origin"] for e in q.examples] == ["b.txt", "d.txt"]  # one example per reason
    assert stats["language"].docs_in == 2


def test_build_steps_skips_disabled_and_rejects_unknown():
    config = CleanConfig()
    config.pii.enabled = False
    assert [s.name for s in build_steps(config, ["unicode", "pii", "quality"])] == ["unicode", "quality"]
    with pytest.raises(ConfigError, match="unknown cleaning step 'qualty'"):
        build_steps(config, ["qualty"])


def test_iter_source_kinds_rows_and_errors(tmp_path):
    (tmp_path / "page.html").write_text(PAGE)
    (tmp_path / "a.txt").write_text(PROSE)
    (tmp_path / "rows.jsonl").write_text('{"text": "one"}\n{"text": "<html><body>two</body></html>"}\n')
    (tmp_path / "m.py").write_text("print(1)\n")
    docs = list(iter_source([tmp_path / "page.html", tmp_path / "a.txt", tmp_path / "rows.jsonl",
                             tmp_path / "m.py"], "src"))
    assert [(d.kind, d.origin.rsplit("/", 1)[-1]) for d in docs] == [
        ("html", "page.html"), ("text", "a.txt"), ("text", "rows.jsonl:1"), ("html", "rows.jsonl:2"),
        ("code", "m.py")]
    assert all(d.source == "src" for d in docs)
    assert len(list(iter_source(tmp_path, "src", kind="text", max_documents=2))) == 2
    with pytest.raises(DataError, match="no such file"):
        list(iter_source(tmp_path / "missing.txt", "src"))
    with pytest.raises(DataError, match="unknown kind"):
        list(iter_source(tmp_path, "src", kind="pdf"))
