"""Benchmark: lmstack's byte-level BPE against Hugging Face ``tokenizers`` and tiktoken, same process.

Corpora (each split 95/5 into train and held-out documents, by document index):
- ``default``: lmstack's built-in corpus (stdlib docstrings + language reference, ~2 MB);
- ``shared``: ``../shared/data/text/`` (tiny Shakespeare + TinyStories, ~4 MB), where present;
- ``stdlib-code``: the standard library's ``.py`` sources, first ``--code-mb`` MB (a larger, varied corpus).

Training: ours (``train_bpe``) and HF's ``BpeTrainer`` with the same GPT-4 split, byte alphabet, special
tokens and vocab size, on the same in-memory documents. Reported: median wall time of ``--repeats`` runs,
peak memory (resident set of this process plus its children, proportional set size, sampled every 20 ms, above the level before
the run), training MB/s, and bytes/token of each tokenizer on the held-out documents.

Encoding (on the largest corpus, vocab 32768): ours through the tiktoken fast path, ours in pure Python,
raw ``tiktoken.Encoding`` built from the same ranks, and HF encoding with its own trained tokenizer.

    .venv/bin/python bench/tokenizer.py                # ~3 minutes on 2 cores
    .venv/bin/python bench/tokenizer.py --quick        # one repeat, smaller code corpus
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import tiktoken  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from lmstack.tokenizer import DEFAULT_SPECIAL_TOKENS, PATTERNS, train_bpe  # noqa: E402
from lmstack.tokenizer.bpe import iter_texts  # noqa: E402

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


# ---------------------------------------------------------------------------------------------------------
# Measuring


def _pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size: pages shared with forked workers are counted once, not once per process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _tree_rss() -> int:
    pid = os.getpid()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return _pss_bytes() + sum(_pss_bytes(c) for c in children)


def measure(fn: Callable[[], object]) -> tuple[float, int, object]:
    """(seconds, peak extra memory in bytes, result) of one call."""
    base = _tree_rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    stop.set()
    t.join()
    return seconds, max(peak[0] - base, 0), result


def repeat(fns: list[Callable[[], object]], n: int) -> list[tuple[float, int, object]]:
    """Run the functions in turn, ``n`` rounds (so a busy neighbour slows all of them alike); per function
    the median time, the largest peak memory and the last result."""
    runs: list[list[tuple[float, int, object]]] = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, runs):
            out.append(measure(fn))
    return [(statistics.median(r[0] for r in rs), max(r[1] for r in rs), rs[-1][2]) for rs in runs]


# ---------------------------------------------------------------------------------------------------------
# Corpora


def default_corpus(tmp: Path) -> list[str] | None:
    try:
        from lmstack.data.corpus import build_default_corpus
    except ImportError:
        return None
    build_default_corpus(tmp / "default")
    return list(iter_texts([tmp / "default" / "train.jsonl", tmp / "default" / "valid.jsonl"]))


def shared_corpus() -> list[str] | None:
    if not SHARED_TEXT.is_dir():
        return None
    docs = []
    for doc in iter_texts([SHARED_TEXT]):
        # whole files are single documents; cut them into paragraphs-sized pieces for a real held-out split
        docs.extend(p for p in doc.split("\n\n") if p.strip())
    return docs


def code_corpus(mb: float) -> list[str]:
    import sysconfig

    docs, size = [], 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode())
        if size >= mb * 1e6:
            break
    return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    return [d for i, d in enumerate(docs) if i % 20], [d for i, d in enumerate(docs) if not i % 20]


# ---------------------------------------------------------------------------------------------------------
# Peers


def hf_train(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.encode_special_tokens = True
    return tok


def bytes_per_token(n_bytes: int, ids_lists: list[list[int]]) -> float:
    return n_bytes / max(1, sum(map(len, ids_lists)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code-mb", type=float, default=16.0)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 4 MB of code")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.code_mb = 1, 4.0
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, tokenizers {__import__('tokenizers').__version__}, "
          f"tiktoken {tiktoken.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"default": default_corpus(Path(tmp)), "shared": shared_corpus(),
                   "stdlib-code": code_corpus(args.code_mb)}
    corpora = {k: v for k, v in corpora.items() if v}

    print("\n## Training (median of %d; peak = extra resident memory incl. worker processes)\n" % args.repeats)
    print("| corpus | MB | vocab | ours s | HF s | ours/HF time | ours MB/s | ours peak MB | HF peak MB "
          "| ours B/tok | HF B/tok | ours/HF B/tok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    trained = {}
    for name, docs in corpora.items():
        train_docs, held = split(docs)
        mb = sum(len(d.encode()) for d in train_docs) / 1e6
        held_bytes = sum(len(d.encode()) for d in held)
        for vocab in args.vocab:
            (t_ours, m_ours, ours), (t_hf, m_hf, hf) = repeat(
                [lambda: train_bpe(train_docs, vocab), lambda: hf_train(train_docs, vocab)], args.repeats)
            bpt_ours = bytes_per_token(held_bytes, ours.encode_batch(held))
            bpt_hf = bytes_per_token(held_bytes, [e.ids for e in hf.encode_batch(held, add_special_tokens=False)])
            trained[(name, vocab)] = (ours, hf, train_docs)
            note = "" if ours.vocab_size == vocab else f" (ours {ours.vocab_size}, HF {hf.get_vocab_size()})"
            print(f"| {name} | {mb:.1f} | {vocab}{note} | {t_ours:.2f} | {t_hf:.2f} | {t_ours / t_hf:.2f}x "
                  f"| {mb / t_ours:.1f} | {m_ours / 1e6:.0f} | {m_hf / 1e6:.0f} | {bpt_ours:.3f} | {bpt_hf:.3f} "
                  f"| {bpt_ours / bpt_hf:.4f} |", flush=True)

    name = "stdlib-code" if "stdlib-code" in corpora else next(iter(corpora))
    vocab = max(args.vocab)
    ours, hf, docs = trained[(name, vocab)]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    raw = tiktoken.Encoding("peer", pat_str=ours.pattern, mergeable_ranks=ours.ranks, special_tokens={})
    py_docs = docs[: max(1, len(docs) // 8)]  # the pure-Python path is slow: time it on an eighth
    py_mb = sum(len(d.encode()) for d in py_docs) / 1e6
    print(f"\n## Encoding ({name}, {mb:.1f} MB, vocab {vocab}; median of {args.repeats})\n")
    print("| encoder | threads | s | MB/s | ratio to tiktoken (same threads) |")
    print("|---|---|---|---|---|")
    rows = [
        ("tiktoken Encoding, our ranks (peer)", 1, lambda: [raw.encode_ordinary(d) for d in docs], mb),
        ("ours, fast path", 1, lambda: [ours.encode(d) for d in docs], mb),
        ("tiktoken encode_ordinary_batch (peer)", 2, lambda: raw.encode_ordinary_batch(docs, num_threads=2), mb),
        ("ours, fast path, encode_batch", 2, lambda: ours.encode_batch(docs), mb),
        ("HF tokenizers encode_batch, own vocab", 2,
         lambda: hf.encode_batch(docs, add_special_tokens=False), mb),
        ("ours, pure Python path", 1, lambda: ours.encode_batch(py_docs, fast=False), py_mb),
    ]
    fast_rows = [r for r in rows if "Python" not in r[0]]
    results = repeat([r[2] for r in fast_rows], args.repeats)
    ours._cache.clear()
    results.append(repeat([rows[-1][2]], 1)[0])
    base: dict[int, float] = {}
    for (label, threads, _, size), (t, _, _) in zip(fast_rows + [rows[-1]], results):
        rate = size / t
        base.setdefault(threads, rate)
        print(f"| {label} | {threads} | {t:.2f} | {rate:.1f} | {rate / base[threads]:.2f}x |", flush=True)
    check = [ours.encode(d, fast=False) for d in py_docs[:50]] == raw.encode_ordinary_batch(py_docs[:50])
    print(f"\nPython path == tiktoken path on {min(50, len(py_docs))} documents: {check}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
