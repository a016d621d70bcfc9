"""``lmstack tokenizer train | encode | stats``: thin wrappers over lmstack.tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmstack.errors import LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    group = subparsers.add_parser(
        "tokenizer", help="train, apply and measure byte-level BPE tokenizers",
        description="Byte-level BPE tokenizers: train on your files, encode text, measure compression.",
        epilog="examples:\n"
               "  lmstack tokenizer train --input corpus/ notes.md --vocab-size 8192 --out runs/tok\n"
               "  lmstack tokenizer encode --tokenizer runs/tok --text 'Hello world'\n"
               "  lmstack tokenizer stats --tokenizer runs/tok --input valid.jsonl",
        formatter_class=HelpFormatter)
    sub = group.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    train = sub.add_parser(
        "train", help="train a byte-level BPE tokenizer on files",
        description="Train a byte-level BPE (GPT-2/GPT-4 style) and write OUT/tokenizer.json "
                    "(loadable by Hugging Face tokenizers) and OUT/tokenizer_vocab.txt.",
        epilog="examples:\n"
               "  lmstack tokenizer train --input data/*.txt --vocab-size 8192 --out runs/tok\n"
               "  lmstack tokenizer train --input corpus.jsonl --vocab-size 32768 --pattern gpt2 --out tok32k\n"
               "  lmstack tokenizer train --input docs/ --vocab-size 4096 --special-tokens '<|bos|>' '<|eos|>' "
               "--out tok",
        formatter_class=HelpFormatter)
    train.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="files, folders or globs (.txt .md .jsonl .json .parquet)")
    train.add_argument("--vocab-size", type=int_at_least(1), required=True,
                       help="total size: 256 bytes + merges + special tokens")
    train.add_argument("--out", required=True, help="output folder (tokenizer.json is written there)")
    train.add_argument("--pattern", default="gpt4", help="pre-tokenization split: gpt2, gpt4 or a regex")
    train.add_argument("--special-tokens", nargs="*", default=None, metavar="TOKEN",
                       help="special tokens (default: bos, eos, pad and the chat role markers)")
    train.add_argument("--workers", type=int_at_least(1), default=None,
                       help="processes counting pre-tokens (default: cores)")
    train.add_argument("--tiktoken", action="store_true", help="also write OUT/tokenizer.tiktoken (rank file)")
    train.set_defaults(func=cmd_train)

    enc = sub.add_parser(
        "encode", help="encode text (or decode ids) with a tokenizer",
        description="Print the ids of text (one line per input line with --lines), or decode ids.",
        epilog="examples:\n"
               "  lmstack tokenizer encode --tokenizer runs/tok --text 'Hello world'\n"
               "  echo 'Hello' | lmstack tokenizer encode --tokenizer runs/tok --tokens\n"
               "  lmstack tokenizer encode --tokenizer runs/tok --decode 15496 995",
        formatter_class=HelpFormatter)
    enc.add_argument("--tokenizer", required=True, help="a run folder, tokenizer.json or .tiktoken file")
    enc.add_argument("--text", default=None, help="text to encode (default: read standard input)")
    enc.add_argument("--lines", action="store_true", help="encode each input line separately")
    enc.add_argument("--tokens", action="store_true", help="show each token's text next to its id")
    enc.add_argument("--allow-special", action="store_true",
                     help="turn special-token strings in the text into special ids (off: they stay text)")
    enc.add_argument("--decode", nargs="+", type=int, default=None, metavar="ID", help="decode these ids instead")
    enc.set_defaults(func=cmd_encode)

    stats = sub.add_parser(
        "stats", help="compression and vocabulary usage of a tokenizer on files",
        description="Bytes/token and chars/token, vocab usage, round trip, longest and most frequent tokens.",
        epilog="examples:\n"
               "  lmstack tokenizer stats --tokenizer runs/tok --input valid.jsonl\n"
               "  lmstack tokenizer stats --tokenizer runs/tok --input 'books/*.txt' --json",
        formatter_class=HelpFormatter)
    stats.add_argument("--tokenizer", required=True, help="a run folder, tokenizer.json or .tiktoken file")
    stats.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or globs")
    stats.add_argument("--max-chars", type=int_at_least(1), default=20_000_000,
                       help="measure on at most this much text")
    stats.add_argument("--top", type=int_at_least(0), default=10,
                       help="how many longest / most frequent tokens to list")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_stats)


def cmd_train(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import train_bpe
    from lmstack.tokenizer.fast import save_tiktoken

    start = time.perf_counter()
    tok = train_bpe([Path(p) for p in args.input], args.vocab_size, pattern=args.pattern,
                    special_tokens=args.special_tokens, workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    path = tok.save(out)
    if args.tiktoken:
        save_tiktoken(tok, out / "tokenizer.tiktoken")
    print(f"trained {tok.vocab_size} tokens ({len(tok.special_tokens)} special) in {seconds:.1f} s -> {path}")
    return 0


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmstackError(f"standard input is not valid UTF-8 (byte {e.start})") from None


def cmd_encode(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import load_tokenizer
    from lmstack.tokenizer.bpe import render_bytes

    if args.decode is not None and (args.text is not None or args.lines or args.tokens or args.allow_special):
        raise LmstackError("--decode takes ids and ignores --text, --lines, --tokens and --allow-special: "
                           "give one or the other")
    tok = load_tokenizer(args.tokenizer)
    if args.decode is not None:
        print(tok.decode(args.decode))
        return 0
    text = args.text if args.text is not None else _read_stdin()
    texts = text.splitlines() if args.lines else [text]
    allowed = "all" if args.allow_special else None
    for ids in tok.encode_batch(texts, allowed_special=allowed):
        if args.tokens:
            print(" ".join(f"{i}:{render_bytes(tok.token_bytes(i))}" for i in ids))
        else:
            print(" ".join(map(str, ids)))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmstack.tokenizer import load_tokenizer
    from lmstack.tokenizer.stats import format_stats, tokenizer_stats

    tok = load_tokenizer(args.tokenizer)
    stats = tokenizer_stats(tok, [Path(p) for p in args.input], max_chars=args.max_chars, top=args.top)
    print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_stats(stats), end="")
    if args.json:
        print()
    return 0
