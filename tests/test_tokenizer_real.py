"""Real tokenizer files from ../shared/data/tokenizers: GPT-2's vocab.json/merges.txt, tokenizer.json and
gpt2.tiktoken give exactly the ids of HF `tokenizers` and tiktoken; load_tokenizer loads every folder."""

from __future__ import annotations

TEXTS = ["Hello world", "It's 2024: naïve café — ünïcode 🙂 and 中文字符.\n\n\tTabs  and   spaces",
         "def f(x):\n    return x ** 2  # comment\n", "   leading spaces", "<|endoftext|> is text here",
         "'s 're 've 'll 'd 'm 't", "1234567890 3.14159 -42"]


def test_gpt2_real_files_match_tokenizers_and_tiktoken(shared_data, tmp_path):
    import shutil

    import tiktoken
    from tokenizers import Tokenizer

    from lmstack.tokenizer import load_tokenizer
    from lmstack.tokenizer.fast import read_tiktoken_ranks

    g = shared_data / "tokenizers" / "gpt2"
    shake = (shared_data / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    texts = TEXTS + [shake[i:i + 3000] for i in range(0, 30000, 3000)]
    ref = Tokenizer.from_file(str(g / "tokenizer.json"))
    ref.encode_special_tokens = True   # lmstack's rule: special strings in text stay text (tiktoken's ordinary)
    enc = tiktoken.Encoding("gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=read_tiktoken_ranks(g / "gpt2.tiktoken"),
                            special_tokens={"<|endoftext|>": 50256})
    slow = tmp_path / "slow"
    slow.mkdir()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(g / f, slow / f)
    ours = {"tokenizer.json": load_tokenizer(g / "tokenizer.json"), "folder": load_tokenizer(g),
            "vocab+merges": load_tokenizer(slow),
            "tiktoken": load_tokenizer(g / "gpt2.tiktoken", pattern="gpt2",
                                       special_tokens={"<|endoftext|>": 50256})}
    for name, tok in ours.items():
        assert tok.eos_id == 50256, name
        for t in texts:
            ids = tok.encode(t)
            assert ids == ref.encode(t, add_special_tokens=False).ids == enc.encode_ordinary(t), (name, t[:30])
            assert tok.decode(ids) == t
        assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_load_tokenizer_loads_every_shared_folder(shared_data):
    from tokenizers import Tokenizer

    from lmstack.tokenizer import load_tokenizer

    bert = load_tokenizer(shared_data / "tokenizers" / "bert-base-uncased")
    ref = Tokenizer.from_file(str(shared_data / "tokenizers" / "bert-base-uncased" / "tokenizer.json"))
    assert bert.encode("Hello world") == ref.encode("Hello world", add_special_tokens=False).ids == [7592, 2088]
    assert bert.add_bos and bert.bos_id == 101                 # its post-processor adds [CLS]
    stories = load_tokenizer(shared_data / "models" / "stories260K")
    assert stories.add_bos and stories.bos_id == 1 and stories.eos_id == 2
    gpt2 = load_tokenizer(shared_data / "tokenizers" / "gpt2")
    assert not gpt2.add_bos and gpt2.eos_id == 50256


def test_tiktoken_folder_takes_its_special_tokens(shared_data, tmp_path):
    import shutil

    from lmstack.tokenizer import load_tokenizer

    for f in ("gpt2.tiktoken", "special_tokens_map.json"):
        shutil.copy(shared_data / "tokenizers" / "gpt2" / f, tmp_path / f)
    tok = load_tokenizer(tmp_path, pattern="gpt2")
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.encode("Hello world") == [15496, 995]
