"""Cleaning and filtering: small composable steps, each counting what it removed and why.

A step is a dataclass (its fields are its config, so a TOML section maps onto it) that is called on one
document's text and returns either the (possibly rewritten) text or :class:`Reject` with a short reason::

    step = QualityFilter(min_words=50)
    step("too short")            # -> Reject("too_few_words")

:func:`apply_steps` runs the steps over a stream of documents and fills one :class:`StepStats` per step
(documents in/out, how many were rewritten, removals by reason and a few removed examples for the report).
A document whose text becomes empty is removed with reason ``empty``.

The steps, and the rules they follow:

- :class:`HtmlToText`: main text of a page (trafilatura, with a standard-library fallback).
- :class:`UnicodeNormalize`: NFC (or NFKC), one kind of newline, no control/zero-width characters, no
  trailing spaces, at most one blank line in a row.
- :class:`BoilerplateLines`: C4's line rules: drop lines that mention javascript, cookie notices and
  policy links ("terms of use", "privacy policy").
- :class:`QualityFilter`: Gopher's document rules (Rae et al. 2021, appendix A): word count, mean word
  length, symbol-to-word ratio, bullet and ellipsis lines, alphabetic words, stop words, duplicate lines
  and paragraphs, top 2-4-gram and duplicate 5-10-gram character fractions; plus C4's "lorem ipsum".
- :class:`LanguageFilter`: langid.py (its model ships in the package) with normalised probabilities.
- :class:`PiiMask`: emails, phone numbers and IPv4/IPv6 addresses replaced by ``<EMAIL>``, ``<PHONE>``,
  ``<IP>``.
- :class:`BookCleanup`: page numbers, running headers, hyphenation across line breaks.
- :class:`CodeCleanup`: drops auto-generated and minified files (StarCoder-style line-length and
  alphanumeric rules), strips license headers.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from lmstack.data.sources import Document, html_to_text
from lmstack.errors import ConfigError


@dataclass(frozen=True)
class Reject:
    """A step's verdict that a document goes, with a short stable reason (``too_few_words``, ``language:fr``)."""
    reason: str


@dataclass
class StepStats:
    """What one step did over a stream: documents in/out, rewritten documents, removals by reason, examples."""
    name: str
    docs_in: int = 0
    docs_out: int = 0
    modified: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    max_examples: int = 2  # per reason

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "modified": self.modified,
                "chars_in": self.chars_in, "chars_out": self.chars_out, "removed": dict(self.removed),
                "examples": self.examples}


def snippet(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def apply_steps(docs: Iterable[Document], steps_for: Callable[[Document], list[Callable[[str], Any]]],
                stats: dict[str, StepStats], max_examples: int = 2) -> Iterator[Document]:
    """Run each document through its steps (``steps_for(doc)``), yield the survivors, fill ``stats`` by step name."""
    for doc in docs:
        for step in steps_for(doc):
            name = step.name
            st = stats.get(name)
            if st is None:
                st = stats[name] = StepStats(name, max_examples=max_examples)
            st.docs_in += 1
            st.chars_in += len(doc.text)
            out = step(doc.text)
            if not isinstance(out, Reject) and not out.strip():
                out = Reject("empty")
            if isinstance(out, Reject):
                st.removed[out.reason] += 1
                if st.removed[out.reason] <= st.max_examples:
                    st.examples.append({"reason": out.reason, "origin": doc.origin, "text": snippet(doc.text)})
                break
            if out != doc.text:
                st.modified += 1
                doc.text = out
            st.docs_out += 1
            st.chars_out += len(out)
        else:
            yield doc


# ---------------------------------------------------------------------------------------------------------
# HTML and Unicode

@dataclass
class HtmlToText:
    name: ClassVar[str] = "html"
    enabled: bool = True
    engine: Literal["trafilatura", "basic"] = "trafilatura"
    include_tables: bool = True

    def __call__(self, text: str) -> str | Reject:
        out = html_to_text(text, self.engine, self.include_tables)
        return out if out.strip() else Reject("no_main_text")


# zero-width space/joiners used as invisible padding, word joiner, BOM, soft hyphen
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad\u200e\u200f"), None)
_SPACES = re.compile(r"[^\S\n\t]+")  # any whitespace but newline and tab, e.g. NBSP, thin space, ideographic space
_MANY_NEWLINES = re.compile(r"\n{3,}")
# control characters (C0/C1 but tab and newline) are noise from broken extraction
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class UnicodeNormalize:
    name: ClassVar[str] = "unicode"
    enabled: bool = True
    form: Literal["NFC", "NFKC"] = "NFC"

    def __call__(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
        text = text.replace("\f", "\n")
        text = unicodedata.normalize(self.form, text).translate(_INVISIBLE)
        text = _CONTROL.sub("", text)
        lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
        return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------------------
# Boilerplate lines (C4) and quality (Gopher)

_JS_LINE = re.compile(r"javascript", re.IGNORECASE)
# cookie *notices*, not every line about cookies ("Lily wanted to use the cookies for the party" stays)
_COOKIE_LINE = re.compile(
    r"\b(?:we|this (?:web)?site|our (?:web)?site|site) (?:also )?uses? cookies|\buse of cookies|"
    r"\b(?:accept|allow|enable|reject|manage) (?:all |our |the )?cookies\b|"
    r"\bcookies? (?:policy|settings|preferences|consent|notice|banner)\b|"
    r"\bcookies? (?:to|help(?:s)? (?:us )?)(?:improve|give|provide|ensure|personali[sz]e|deliver|analy[sz]e)",
    re.IGNORECASE)
_POLICY_LINE = re.compile(r"terms of (?:use|service)|privacy policy|cookie policy|terms and conditions",
                          re.IGNORECASE)


@dataclass
class BoilerplateLines:
    name: ClassVar[str] = "boilerplate"
    enabled: bool = True
    javascript: bool = True
    cookies: bool = True
    policies: bool = True

    def __call__(self, text: str) -> str | Reject:
        kept = []
        for line in text.split("\n"):
            if ((self.javascript and _JS_LINE.search(line)) or (self.cookies and _COOKIE_LINE.search(line))
                    or (self.policies and _POLICY_LINE.search(line))):
                continue
            kept.append(line)
        out = "\n".join(kept).strip()
        return out if out else Reject("only_boilerplate")


# a line drawn only with table-rule characters: reST grid/simple tables, Markdown separators, ASCII boxes
_TABLE_RULE = re.compile(r"^\s*[-=+|:~*#_ ]*([-=~*#_])\1{2,}[-=+|:~*#_ ]*$")


@dataclass
class TableRules:
    """Drop lines that only draw a table or a box (``+-----+----+``, ``====  ====``, ``|---|:--:|``).

    Such rules are markup, not text; left in, the tokenizer spends long tokens on them (the default
    corpus's longest tokens were runs of ``=`` and ``-``)."""
    name: ClassVar[str] = "tables"
    enabled: bool = True

    def __call__(self, text: str) -> str | Reject:
        kept = [line for line in text.split("\n") if not _TABLE_RULE.match(line)]
        out = "\n".join(kept).strip()
        return out if out else Reject("only_table_rules")


_BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "·")
_WORD_STRIP = "\"'`.,;:!?()[]{}<>«»“”‘’…-—–*_#"
_ALPHA = re.compile(r"[^\W\d_]")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier that spreads word ids over 64 bits


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit key per word n-gram (wrapping arithmetic; collisions are negligible at these sizes)."""
    keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            keys = keys * _GOLDEN + ids[k: len(ids) - n + 1 + k]
    return keys


def repetition_stats(words: list[str]) -> dict[str, float]:
    """Gopher's n-gram repetition measures over (normalised) words.

    ``top_n`` (n = 2, 3, 4): fraction of word characters inside occurrences of the most frequent n-gram;
    ``dup_n`` (n = 5..10): fraction of word characters covered by n-grams that occurred earlier in the text.
    """
    out: dict[str, float] = {}
    if not words:
        return out
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab) + 1) for w in words), dtype=np.uint64, count=len(words))
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = max(int(lengths.sum()), 1)
    csum = np.concatenate([[0], np.cumsum(lengths)])
    for n in range(2, 11):
        if len(words) < n:
            break
        keys = _ngram_keys(ids, n)
        uniq, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        if n <= 4:
            best = int(np.argmax(counts))
            if counts[best] > 1:
                start = int(first[best])
                out[f"top_{n}"] = int(counts[best]) * int(csum[start + n] - csum[start]) / total
            else:
                out[f"top_{n}"] = 0.0
        else:
            starts = np.nonzero(np.arange(len(keys)) != first[inverse])[0]
            diff = np.zeros(len(words) + 1, dtype=np.int64)
            np.add.at(diff, starts, 1)
            np.add.at(diff, starts + n, -1)
            covered = np.cumsum(diff[:-1]) > 0
            out[f"dup_{n}"] = float(lengths[covered].sum()) / total
    return out


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for it in items:
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        seen.add(it)
    return dup_n / len(items), dup_chars / max(sum(map(len, items)), 1)


@dataclass
class QualityFilter:
    """Gopher quality rules (defaults are the paper's thresholds) plus C4's lorem-ipsum rule."""
    name: ClassVar[str] = "quality"
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1        # ('#' + '...') per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8         # words holding at least one letter
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    min_stop_words: int = 2              # () or 0 disables: the list is English
    max_duplicate_lines: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_paragraph_chars: float = 0.2
    max_top_ngram: tuple[float, float, float] = (0.20, 0.18, 0.16)                     # n = 2, 3, 4
    max_dup_ngram: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)            # n = 5 .. 10
    reject_lorem_ipsum: bool = True

    def __post_init__(self) -> None:
        if len(self.max_dup_ngram) != 6:
            raise ConfigError("clean.quality.max_dup_ngram: give 6 fractions, for n = 5..10")

    def __call__(self, text: str) -> str | Reject:
        reason = self.reason(text)
        return Reject(reason) if reason else text

    def reason(self, text: str) -> str | None:
        """The first rule the text breaks, or None when it passes all of them."""
        if self.reject_lorem_ipsum and "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        raw_words = text.split()
        n = len(raw_words)
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        mean_len = sum(map(len, raw_words)) / n
        if not self.min_mean_word_length <= mean_len <= self.max_mean_word_length:
            return "mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol_ratio:
            return "symbol_ratio"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if lines:
            if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > self.max_bullet_lines:
                return "bullet_lines"
            if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines:
                return "ellipsis_lines"
        if sum(1 for w in raw_words if _ALPHA.search(w)) / n < self.min_alpha_words:
            return "alpha_words"
        words = [w for w in (w.lower().strip(_WORD_STRIP) for w in raw_words) if w]
        if self.min_stop_words and self.stop_words:
            stops = set(self.stop_words)
            if sum(1 for w in words if w in stops) < self.min_stop_words:
                return "stop_words"
        frac, chars = _duplicate_fractions(lines)
        if frac > self.max_duplicate_lines:
            return "duplicate_lines"
        if chars > self.max_duplicate_line_chars:
            return "duplicate_line_chars"
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        frac, chars = _duplicate_fractions(paragraphs)
        if frac > self.max_duplicate_paragraphs:
            return "duplicate_paragraphs"
        if chars > self.max_duplicate_paragraph_chars:
            return "duplicate_paragraph_chars"
        rep = repetition_stats(words)
        for n_, limit in zip((2, 3, 4), self.max_top_ngram):
            if rep.get(f"top_{n_}", 0.0) > limit:
                return f"top_{n_}gram"
        for n_, limit in zip(range(5, 11), self.max_dup_ngram):
            if rep.get(f"dup_{n_}", 0.0) > limit:
                return f"duplicate_{n_}gram"
        return None


# ---------------------------------------------------------------------------------------------------------
# Language

_LANGID: Any = None


def _identifier() -> Any:
    global _LANGID
    if _LANGID is None:  # loading the model takes about a second, so once per process
        from lmstack.extras import require

        langid = require("langid.langid", "the language filter (clean step 'language')")
        LanguageIdentifier, model = langid.LanguageIdentifier, langid.model

        _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _LANGID


def identify_language(text: str, max_chars: int = 4000) -> tuple[str, float]:
    """(ISO 639-1 code, normalised probability) from langid.py's bundled model, on the first ``max_chars``
    characters (lower-cased when mostly upper-case)."""
    sample = text[:max_chars]
    letters = sum(ch.isalpha() for ch in sample)
    if sum(ch.isupper() for ch in sample) > 0.5 * max(letters, 1):
        # langid's n-gram model saw mostly lower-case text: shouted English comes out Norwegian
        sample = sample.lower()
    # langid's own classify multiplies a uint32 count vector by the dense (features x languages) matrix,
    # which numpy does without BLAS (~15 ms a document); only the few non-zero features matter, so the
    # same log-probabilities come from a gather over those rows (tests check parity with langid)
    ident = _identifier()
    fv = ident.instance2fv(sample)
    nz = np.flatnonzero(fv)
    logp = fv[nz].astype(np.float64) @ ident.nb_ptc[nz] + ident.nb_pc
    best = int(np.argmax(logp))
    with np.errstate(over="ignore"):
        prob = 1.0 / np.exp(logp - logp[best]).sum()
    return str(ident.nb_classes[best]), float(prob)


@dataclass
class LanguageFilter:
    name: ClassVar[str] = "language"
    enabled: bool = True
    languages: tuple[str, ...] = ("en",)
    min_probability: float = 0.5
    max_chars: int = 4000
    # below this many characters the identification is a guess ("Too short to keep." comes out Norwegian),
    # so such texts pass unjudged and the quality step's word count decides
    min_chars: int = 40

    def __call__(self, text: str) -> str | Reject:
        if len(text) < self.min_chars:
            return text
        lang, prob = identify_language(text, self.max_chars)
        if lang not in self.languages:
            return Reject(f"language:{lang}")
        if prob < self.min_probability:
            return Reject("language_uncertain")
        return text


# ---------------------------------------------------------------------------------------------------------
# PII

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# optional +country code, optional (area), then 2-5 groups of digits split by space, dot or hyphen
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w]|[.-]\d)")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _is_phone(s: str) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    if not 7 <= digits <= 15 or _DATE.match(s):
        return False
    if s.startswith("+") or "(" in s:
        return True
    # without a country code or area code in brackets, ask for a national-length number or the 3-4 form
    return digits >= 9 or re.fullmatch(r"\d{3}-\d{4}", s) is not None


@dataclass
class PiiMask:
    name: ClassVar[str] = "pii"
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ips: bool = True
    email_token: str = "<EMAIL>"
    phone_token: str = "<PHONE>"
    ip_token: str = "<IP>"

    def __call__(self, text: str) -> str:
        if self.emails:
            text = _EMAIL.sub(self.email_token, text)
        if self.ips:
            text = _IPV4.sub(lambda m: self.ip_token if _valid_ip(m.group()) else m.group(), text)
            text = _IPV6.sub(lambda m: self.ip_token if _valid_ipv6(m.group()) else m.group(), text)
        if self.phones:
            text = _PHONE.sub(lambda m: self.phone_token if _is_phone(m.group()) else m.group(), text)
        return text


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _valid_ipv6(s: str) -> bool:
    if sum(1 for g in s.split(":") if g) < 3:  # "a::b", "12:30" and such are not worth masking
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Books

# "12", "- 12 -", "[12]", "Page 12", "p. 12", and lower-case roman numerals of front matter ("xiv");
# an upper-case "IV" alone on a line is more often a chapter heading, so it stays
_PAGE_NUMBER = re.compile(r"^\s*(?:[-–—\[(]\s*)?(?:(?i:page\s+|p\.\s*)?\d{1,4}|"
                          r"(?=[ivxlcdm])m{0,3}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3}))"
                          r"(?:\s*[-–—\])])?\s*$")
_HYPHEN_BREAK = re.compile(r"(\w+)-\n[ \t]*(\w+)(\S*)([ \t]+)?")


@dataclass
class BookCleanup:
    name: ClassVar[str] = "book"
    enabled: bool = True
    page_numbers: bool = True
    running_headers: bool = True
    min_header_repeats: int = 3      # a short line seen this often (digits ignored) is a running header
    max_header_chars: int = 60
    dehyphenate: bool = True

    def __call__(self, text: str) -> str:
        lines = text.split("\n")
        if self.page_numbers:
            lines = [ln for ln in lines if not _PAGE_NUMBER.match(ln) or not ln.strip()]
        if self.running_headers:
            keys = [self._header_key(ln) for ln in lines]
            counts = Counter(k for k in keys if k)
            lines = [ln for ln, k in zip(lines, keys) if not (k and counts[k] >= self.min_header_repeats)]
        text = _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()
        if self.dehyphenate:
            text = dehyphenate(text)
        return text

    def _header_key(self, line: str) -> str | None:
        s = line.strip()
        # titles carry no sentence punctuation; "Yes." repeated in dialogue is not a header
        if not s or len(s) > self.max_header_chars or s[-1] in ".!?\"'”’:;,":
            return None
        key = re.sub(r"\d+", "#", " ".join(s.split())).strip(" #|-–—").lower()
        return key or None


def dehyphenate(text: str) -> str:
    """Join words split across lines ("exam-\\nple" -> "example"), moving the rest of the word up.

    A compound ("well-\\nknown") keeps its hyphen when the document spells it with a hyphen elsewhere and
    never without one.
    """
    words = Counter(w.lower() for w in re.findall(r"[\w-]+", text))

    def join(m: re.Match) -> str:
        left, right, tail, space = m.groups()
        joined, hyphened = f"{left}{right}".lower(), f"{left}-{right}".lower()
        glue = "-" if words[hyphened] > 0 and words[joined] == 0 else ""
        # the line break moves to after the joined word; if the word ended its line, that break stays
        return f"{left}{glue}{right}{tail}" + ("\n" if space else "")

    return _HYPHEN_BREAK.sub(join, text)


# ---------------------------------------------------------------------------------------------------------
# Code

_GENERATED = re.compile(r"auto[- ]?generated|automatically generated|@generated|do not edit|code generated by|"
                        r"this file (?:is|was|has been) generated|generated by [\w.-]+ (?:v?\d|version|compiler)",
                        re.IGNORECASE)
_LICENSE = re.compile(r"licen[sc]e|copyright|\(c\)|spdx-license-identifier|permission is hereby granted|"
                      r"all rights reserved", re.IGNORECASE)
_LINE_COMMENT = re.compile(r"^\s*(?:#|//|--|;|%|\*)")


@dataclass
class CodeCleanup:
    name: ClassVar[str] = "code"
    enabled: bool = True
    drop_generated: bool = True
    drop_minified: bool = True
    max_mean_line_length: float = 100.0
    max_line_length: int = 1000
    min_alnum_fraction: float = 0.25
    strip_license_header: bool = True

    def __call__(self, text: str) -> str | Reject:
        if self.drop_generated and _GENERATED.search("\n".join(text.split("\n", 15)[:15])):
            return Reject("auto_generated")
        lines = text.split("\n")
        if self.drop_minified:
            lengths = [len(ln) for ln in lines]
            if max(lengths) > self.max_line_length or sum(lengths) / len(lengths) > self.max_mean_line_length:
                return Reject("minified")
        if sum(ch.isalnum() for ch in text) / max(len(text), 1) < self.min_alnum_fraction:
            return Reject("low_alnum")
        if self.strip_license_header:
            text = strip_license_header(text)
        return text


def strip_license_header(code: str) -> str:
    """Remove a leading comment block (``#``/``//`` lines or a ``/* */`` block) that states a license.

    A shebang or encoding line above it stays.
    """
    lines = code.split("\n")
    head: list[str] = []
    while lines and (lines[0].startswith("#!") or re.match(r"^#.*coding[:=]", lines[0])):
        head.append(lines.pop(0))
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    start = i
    if i < len(lines) and lines[i].lstrip().startswith("/*"):
        while i < len(lines) and "*/" not in lines[i]:
            i += 1
        end = min(i + 1, len(lines))
    else:
        while i < len(lines) and _LINE_COMMENT.match(lines[i]) and not lines[i].startswith("#!"):
            i += 1
        end = i
    block = "\n".join(lines[start:end])
    if end > start and _LICENSE.search(block):
        rest = lines[end:]
        while rest and not rest[0].strip():
            rest.pop(0)
        lines = rest
    return "\n".join(head + lines)


# ---------------------------------------------------------------------------------------------------------
# Configuring the chains

@dataclass
class CleanConfig:
    """One section per step; ``enabled = false`` turns a step off everywhere."""
    html: HtmlToText = field(default_factory=HtmlToText)
    unicode: UnicodeNormalize = field(default_factory=UnicodeNormalize)
    boilerplate: BoilerplateLines = field(default_factory=BoilerplateLines)
    tables: TableRules = field(default_factory=TableRules)
    quality: QualityFilter = field(default_factory=QualityFilter)
    language: LanguageFilter = field(default_factory=LanguageFilter)
    pii: PiiMask = field(default_factory=PiiMask)
    book: BookCleanup = field(default_factory=BookCleanup)
    code: CodeCleanup = field(default_factory=CodeCleanup)


STEP_NAMES = ("html", "unicode", "boilerplate", "tables", "book", "code", "language", "quality", "pii")
# language runs before quality because Gopher's stop-word rule is English: a German page should go as
# "language:de", not as "stop_words"
DEFAULT_CHAINS: dict[str, tuple[str, ...]] = {
    "text": ("unicode", "boilerplate", "language", "quality", "pii"),
    "html": ("html", "unicode", "boilerplate", "language", "quality", "pii"),
    "book": ("unicode", "book", "language", "quality", "pii"),
    "code": ("unicode", "code", "pii"),
}


def build_steps(config: CleanConfig, names: Iterable[str]) -> list[Callable[[str], Any]]:
    """The enabled steps named in ``names``, in that order (unknown names are a ConfigError)."""
    steps = []
    for name in names:
        if name not in STEP_NAMES:
            raise ConfigError(f"unknown cleaning step {name!r}; known steps: {', '.join(STEP_NAMES)}")
        step = getattr(config, name)
        if step.enabled:
            steps.append(step)
    return steps
