"""Benchmark: lmstack.data's cleaning steps, near-dedup and packing, against peers, same process, same documents.

Documents: ``../shared/data/text/tinystories/tinystories_train_first2MiB.txt`` (its first 2 MiB split on
``<|endoftext|>``) when present, else the built-in corpus (stdlib docstrings, ``build_default_corpus``)
written to a temp dir. Every figure is the median of ``--repeats`` passes; ours and the peer alternate
within each repeat, so a change in the machine's load hits both.

Sections:
1. cleaning: docs/s and MB/s of each step (``[step(d) for d in docs]``); language identification vs
   ``langid.classify`` (the same bundled model) on a sample, with the labels asserted identical;
2. near-dedup: ``NearDedup`` vs ``datasketch`` (MinHash + MinHashLSH, same num_perm, threshold, word
   5-gram shingles, keep-first, candidates confirmed by the estimated Jaccard) on the documents plus
   injected paraphrases of some of them; docs/s and agreement of the flagged sets;
3. packing: tokens/s of ``tokenize_stream`` and ``pack_texts`` (1 and 2 workers) vs a plain loop over
   the tokenizer's ``encode``, with a BPE trained on the documents (vocab 4096).

    .venv/bin/python bench/data.py                 # about 25 s on 2 cores
    .venv/bin/python bench/data.py --repeats 1     # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import langid
from datasketch import MinHash, MinHashLSH

from lmstack.data.clean import CleanConfig, build_steps, identify_language
from lmstack.data.corpus import build_default_corpus
from lmstack.data.dedup import NearDedup
from lmstack.data.pack import pack_texts, tokenize_stream
from lmstack.tokenizer import train_bpe

SHARED_STORIES = (Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinystories"
                  / "tinystories_train_first2MiB.txt")
_WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------------------------------------------
# Helpers


def load_documents(limit_bytes: int = 2 << 20) -> tuple[list[str], str]:
    """The benchmark documents and a line saying where they came from."""
    if SHARED_STORIES.is_file():
        with open(SHARED_STORIES, "rb") as f:
            raw = f.read(limit_bytes).decode("utf-8", errors="ignore")
        parts = raw.split("<|endoftext|>") if "<|endoftext|>" in raw else [raw]
        docs = [p.strip() for p in parts if p.strip()]
        return docs, f"{SHARED_STORIES.name} (first {limit_bytes >> 20} MiB, split on <|endoftext|>)"
    tmp = tempfile.mkdtemp(prefix="lmstack-bench-data-")
    build_default_corpus(tmp)
    docs, size = [], 0
    with open(Path(tmp) / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            size += len(text.encode())
            if size > limit_bytes:
                break
            docs.append(text)
    return docs, f"lmstack default corpus (stdlib docstrings, first {limit_bytes >> 20} MiB)"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn within every repeat."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_line(tag: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {tag}: {one:.2f} {five:.2f} {fifteen:.2f} (on {os.cpu_count()} CPUs)"


# ---------------------------------------------------------------------------------------------------------
# 1. Cleaning steps


def bench_clean(docs: list[str], repeats: int, lang_sample: int) -> str:
    mb = sum(len(d.encode()) for d in docs) / 1e6
    steps = build_steps(CleanConfig(), ["unicode", "boilerplate", "language", "quality", "pii"])
    rows = []
    for step in steps:
        step(docs[0])  # loads langid's model once, outside the timing
        sec = interleaved({"ours": lambda s=step: [s(d) for d in docs]}, repeats)["ours"]
        kept = sum(isinstance(out, str) for out in (step(d) for d in docs))
        rows.append([step.name, len(docs), f"{sec:.2f}", fmt(len(docs) / sec), f"{mb / sec:.2f}", kept])
    out = [table(["step", "docs", "s", "docs/s", "MB/s", "kept"], rows)]

    # language ID against langid.classify: the same text to both, already in the form identify_language
    # feeds the model (first max_chars characters, lower-cased when mostly upper-case), so labels can match
    sample = [shouted_to_lower(d[:4000]) for d in docs[:lang_sample]]
    langid.classify(sample[0])  # the peer loads its model lazily too
    ours_labels = [identify_language(t)[0] for t in sample]
    peer_labels = [langid.classify(t)[0] for t in sample]
    same = sum(a == b for a, b in zip(ours_labels, peer_labels))
    assert same == len(sample), f"language labels differ on {len(sample) - same} of {len(sample)} documents"
    smb = sum(len(t.encode()) for t in sample) / 1e6
    # langid.classify multiplies a uint32 vector by a float32 (7480 x 97) matrix: numpy casts it to float64
    # and calls OpenBLAS, whose threads spin-wait when the other core is busy (8 ms instead of 0.5 ms a
    # document here), so each side is timed with numpy's BLAS at its default threads and at 1 thread
    default = blas_threads()
    fns = {}
    for threads in dict.fromkeys([default, 1]):
        fns[("ours", threads)] = with_blas(threads, lambda: [identify_language(t) for t in sample])
        fns[("peer", threads)] = with_blas(threads, lambda: [langid.classify(t) for t in sample])
    secs = interleaved(fns, repeats)
    lrows = []
    for threads in dict.fromkeys([default, 1]):
        o, p = secs[("ours", threads)], secs[("peer", threads)]
        lrows.append([threads, len(sample), fmt(len(sample) / o), fmt(len(sample) / p), f"{smb / o:.2f}",
                      f"{smb / p:.2f}", f"**{p / o:.1f}x**"])
    out.append(table(["numpy BLAS threads", "docs", "ours docs/s (identify_language)", "peer docs/s (langid.classify)",
                      "ours MB/s", "peer MB/s", "ours/peer docs/s"], lrows))
    out.append(f"Labels identical on {same}/{len(sample)} documents "
               f"({', '.join(f'{k}: {v}' for k, v in sorted(_counts(ours_labels).items()))}); same bundled model, "
               f"same text to both (first 4000 characters).")
    return "\n\n".join(out)


def shouted_to_lower(text: str) -> str:
    letters = sum(ch.isalpha() for ch in text)
    return text.lower() if sum(ch.isupper() for ch in text) > 0.5 * max(letters, 1) else text


def blas_threads() -> int | str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "default"
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else "default"


def with_blas(threads: int | str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with numpy's BLAS limited to ``threads`` (unchanged when threadpoolctl is missing)."""
    def run() -> Any:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return fn()
        with threadpool_limits(limits=threads if isinstance(threads, int) else None, user_api="blas"):
            return fn()
    return run


def _counts(items: list[str]) -> dict[str, int]:
    c: dict[str, int] = {}
    for x in items:
        c[x] = c.get(x, 0) + 1
    return c


# ---------------------------------------------------------------------------------------------------------
# 2. Near-duplicates


_SWAPS = {"little": "small", "big": "large", "happy": "glad", "said": "replied", "mom": "mother",
          "dad": "father", "saw": "noticed", "went": "walked", "wanted": "wished", "very": "really",
          "day": "morning", "play": "have fun", "friend": "pal", "girl": "child", "boy": "kid"}


def paraphrase(text: str, rate: float, rng: random.Random) -> str:
    """A light rewrite: each word is, with probability ``rate``, swapped for a synonym, dropped or doubled."""
    out = []
    for w in text.split(" "):
        if rng.random() >= rate:
            out.append(w)
            continue
        key = w.lower().strip(".,!?\"'")
        r = rng.random()
        if key in _SWAPS and r < 0.6:
            out.append(w.lower().replace(key, _SWAPS[key]))
        elif r < 0.8:
            continue
        else:
            out += [w, w]
    return " ".join(out)


def shingle_set(text: str, n: int = 5) -> set[str]:
    words = _WORD.findall(text.lower())
    k = min(n, len(words))
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)} if words else set()


def exact_jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def ours_dedup(corpus: list[str], threshold: float, num_perm: int) -> set[int]:
    dd = NearDedup(threshold=threshold, num_perm=num_perm)
    return {i for i, d in enumerate(corpus) if not isinstance(dd(d), str)}


def peer_dedup(corpus: list[str], threshold: float, num_perm: int) -> set[int]:
    """datasketch, the usual recipe: word 5-gram shingles, MinHashLSH query, keep the first of a cluster."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    store: dict[int, MinHash] = {}
    shingles = ([s.encode() for s in shingle_set(d)] for d in corpus)
    flagged = set()
    for i, m in enumerate(MinHash.generator(shingles, num_perm=num_perm)):
        # confirm candidates by estimated Jaccard, as NearDedup does (LSH alone lets false positives through)
        if any(lsh_m.jaccard(m) >= threshold for lsh_m in (store[k] for k in lsh.query(m))):
            flagged.add(i)
            continue
        store[i] = m
        lsh.insert(i, m)
    return flagged


def bench_dedup(docs: list[str], repeats: int, threshold: float, num_perm: int, n_dups: int) -> str:
    rng = random.Random(0)
    rates = (0.02, 0.05, 0.1, 0.2)
    sources = rng.sample(range(len(docs)), n_dups)
    injected = [(src, paraphrase(docs[src], rates[j % len(rates)], rng)) for j, src in enumerate(sources)]
    rng.shuffle(injected)
    corpus = docs + [t for _, t in injected]
    inj_idx = {len(docs) + j: src for j, (src, _) in enumerate(injected)}
    truth = {i for i, src in inj_idx.items() if exact_jaccard(docs[src], corpus[i]) >= threshold}

    results: dict[str, set[int]] = {}
    secs = interleaved({"ours": lambda: results.__setitem__("ours", ours_dedup(corpus, threshold, num_perm)),
                        "peer": lambda: results.__setitem__("peer", peer_dedup(corpus, threshold, num_perm))}, repeats)
    ours, peer = results["ours"], results["peer"]
    mb = sum(len(d.encode()) for d in corpus) / 1e6
    dd = NearDedup(threshold=threshold, num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def against_truth(flagged: set[int]) -> str:
        inj = flagged & set(inj_idx)
        return f"{len(inj & truth)}/{len(truth)}"

    rows = []
    for k, name, bands in (("ours", "ours: NearDedup", f"{dd.bands}x{dd.rows}"),
                           ("peer", "peer: datasketch MinHash + MinHashLSH", f"{lsh.b}x{lsh.r}")):
        flagged = results[k]
        rows.append([name, bands, len(corpus), f"{secs[k]:.2f}", fmt(len(corpus) / secs[k]),
                     f"{mb / secs[k]:.2f}", len(flagged), against_truth(flagged),
                     len(flagged & set(inj_idx) - truth), len(flagged - set(inj_idx))])
    agree = len(ours & peer) / max(len(ours | peer), 1)
    # a disagreement is expected where the true similarity sits near the threshold: both sides estimate it
    # from 128 hash values (standard error ~0.04 at J = 0.7)
    differ = ours ^ peer
    near = sum(i in inj_idx and abs(exact_jaccard(docs[inj_idx[i]], corpus[i]) - threshold) < 0.1 for i in differ)
    header = ["near-dedup", "bands x rows", "docs", "s", "docs/s", "MB/s", "flagged",
              "injected with J>=t caught", "injected with J<t flagged", "flagged among originals"]
    return "\n\n".join([
        table(header, rows),
        f"ours/peer docs/s: **{secs['peer'] / secs['ours']:.2f}x**; flagged sets: Jaccard **{agree:.3f}** "
        f"(both {len(ours & peer)}, ours only {len(ours - peer)}, datasketch only {len(peer - ours)}; "
        f"{near} of the {len(differ)} disagreements are paraphrases with exact J within 0.1 of the threshold). "
        f"Corpus: {len(docs)} documents + {n_dups} paraphrases (a quarter each with word edit rates "
        f"{', '.join(map(str, rates))}), shuffled in after all originals; {len(truth)} of them have exact "
        f"Jaccard >= {threshold} with their source (word 5-gram shingles); threshold {threshold}, "
        f"num_perm {num_perm}.",
        _by_rate_table(docs, injected, inj_idx, sources, rates, results, threshold),
    ])


def _by_rate_table(docs: list[str], injected: list[tuple[int, str]], inj_idx: dict[int, int], sources: list[int],
                   rates: tuple[float, ...], results: dict[str, set[int]], threshold: float) -> str:
    # the paraphrase rate of each source was fixed by its position in ``sources`` before the shuffle
    rate_of_src = {src: rates[j % len(rates)] for j, src in enumerate(sources)}
    rows = []
    for rate in rates:
        idx = [i for i, src in inj_idx.items() if rate_of_src[src] == rate]
        js = [exact_jaccard(docs[inj_idx[i]], injected[i - len(docs)][1]) for i in idx]
        rows.append([rate, len(idx), f"{statistics.median(js):.2f}", sum(j >= threshold for j in js),
                     sum(i in results["ours"] for i in idx), sum(i in results["peer"] for i in idx)])
    return table(["edit rate", "paraphrases", "median exact J", "J >= t", "ours flagged", "datasketch flagged"], rows)


# ---------------------------------------------------------------------------------------------------------
# 3. Packing


def bench_pack(docs: list[str], repeats: int, vocab: int) -> str:
    t_train, tok = timed(lambda: train_bpe(docs, vocab))
    reference = [tok.encode(d) for d in docs]
    n_tokens = sum(map(len, reference))
    mb = sum(len(d.encode()) for d in docs) / 1e6
    for w in (1, 2):  # same ids, in order, whatever the worker count
        got = list(tokenize_stream(docs, tok, workers=w))
        assert all(np.array_equal(a, b) for a, b in zip(got, reference)) and len(got) == len(reference)
    tmp = tempfile.mkdtemp(prefix="lmstack-bench-pack-")
    counter = iter(range(10_000))

    def pack(w: int) -> None:
        index = pack_texts(docs, tok, Path(tmp) / f"set{next(counter)}", workers=w)
        assert index["tokens"] == n_tokens + len(docs)

    fns = {"loop": lambda: [tok.encode(d) for d in docs],
           "batch": lambda: [tok.encode_batch(docs[i:i + 64]) for i in range(0, len(docs), 64)],
           "stream1": lambda: sum(1 for _ in tokenize_stream(docs, tok, workers=1)),
           "stream2": lambda: sum(1 for _ in tokenize_stream(docs, tok, workers=2)),
           "pack1": lambda: pack(1), "pack2": lambda: pack(2)}
    secs = interleaved(fns, repeats)
    names = {"loop": "peer: plain loop `[tok.encode(d) for d in docs]`",
             "batch": "diagnostic: `tok.encode_batch` on 64-doc chunks (what tokenize_stream called before the fix)",
             "stream1": "ours: tokenize_stream, workers=1", "stream2": "ours: tokenize_stream, workers=2",
             "pack1": "ours: pack_texts (tokenize + write shards), workers=1",
             "pack2": "ours: pack_texts (tokenize + write shards), workers=2"}
    rows = [[names[k], f"{secs[k]:.3f}", fmt(n_tokens / secs[k]), fmt(len(docs) / secs[k]), f"{mb / secs[k]:.2f}",
             f"{secs['loop'] / secs[k]:.2f}x"] for k in fns]
    return "\n\n".join([
        table(["tokenize", "s", "tokens/s", "docs/s", "MB/s", "ours/peer tokens/s"], rows),
        f"BPE trained on the documents in {t_train:.1f} s, vocab {tok.vocab_size}; {n_tokens:,} tokens "
        f"({mb * 1e6 / n_tokens:.2f} bytes/token); ids from every path equal the loop's.",
    ])


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lang-sample", type=int, default=300, help="documents for the langid comparison")
    ap.add_argument("--dups", type=int, default=400, help="paraphrased duplicates injected")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    docs, origin = load_documents()
    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy "
          f"{np.__version__}, langid {version('langid')}, datasketch {version('datasketch')}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"Command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"Documents: {len(docs):,} from {origin}, {sum(len(d.encode()) for d in docs) / 1e6:.2f} MB; "
          f"median of {args.repeats}, ours and peer interleaved")
    print(load_line("at start"))
    print("\n### Cleaning steps (single process)\n")
    print(bench_clean(docs, args.repeats, args.lang_sample), flush=True)
    print(load_line("after cleaning"))
    print("\n### Near-duplicates: MinHash + LSH\n")
    print(bench_dedup(docs, args.repeats, args.threshold, args.num_perm, args.dups), flush=True)
    print(load_line("after dedup"))
    print("\n### Packing: tokenization\n")
    print(bench_pack(docs, args.repeats, args.vocab), flush=True)
    print(load_line("at end"))
    print(f"\nTotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
