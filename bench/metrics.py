"""Metric throughput, ours vs the reference library, same inputs, same process.

Items/s (median of --repeats runs) for BLEU and chrF (sacrebleu: corpus score + one sentence score per
item, as ours computes), ROUGE-1/2/L/Lsum (rouge-score), METEOR (nltk), Levenshtein (rapidfuzz, a C++
library) and BERTScore (bert-score with the same all-MiniLM-L6-v2 weights and layer).

    .venv/bin/python bench/metrics.py [--n 500] [--bert-n 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.eval import compute_metric  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "mt" / "ted_sl_en"


def timed_pair(ours, peer, repeats: int) -> tuple[float, float]:
    """Median seconds of each, runs interleaved so a busy neighbour slows both sides alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (peer, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def meteor_cold(hyps: list[str], refs: list[str], repeats: int) -> tuple[float, float]:
    """METEOR items/s from empty caches, both sides: our per-word synonym cache is cleared before each run, and
    nltk gets a fresh WordNet reader (built outside the timed part) so its synset cache starts empty too. The
    warm figure above is the same work only for us; this is the like-for-like one."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.translate.meteor_score import meteor_score

    from lmstack.eval.metrics import meteor as ours_meteor
    from lmstack.eval.metrics.wordnet import load_wordnet

    root = load_wordnet().root
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        ours_meteor._synonyms().cache_clear()      # the inner per-word cache
        t0 = time.perf_counter()
        compute_metric("meteor", hyps, refs)
        times[0].append(time.perf_counter() - t0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = WordNetCorpusReader(root, None)
        t0 = time.perf_counter()
        [meteor_score([r.split()], h.split(), wordnet=fresh) for h, r in zip(hyps, refs)]
        times[1].append(time.perf_counter() - t0)
    return len(hyps) / statistics.median(times[0]), len(hyps) / statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--bert-n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    hyps = (DATA / "ted.sys2.detok.en").read_text(encoding="utf-8").splitlines()[:args.n]
    refs = (DATA / "ted.ref.detok.en").read_text(encoding="utf-8").splitlines()[:args.n]

    import bert_score
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rapidfuzz.distance import Levenshtein
    from rouge_score import rouge_scorer

    from lmstack.eval.metrics.bertscore import default_encoder_path, load_encoder
    from lmstack.eval.metrics.wordnet import load_wordnet

    wn = load_wordnet()
    peers = {
        "bleu": lambda: (sacrebleu.corpus_bleu(hyps, [refs]),
                         [sacrebleu.sentence_bleu(h, [r]) for h, r in zip(hyps, refs)]),
        "chrf": lambda: (sacrebleu.corpus_chrf(hyps, [refs]),
                         [sacrebleu.sentence_chrf(h, [r]) for h, r in zip(hyps, refs)]),
        "levenshtein": lambda: [Levenshtein.distance(h, r) for h, r in zip(hyps, refs)],
        "meteor": lambda: [meteor_score([r.split()], h.split(), wordnet=wn) for h, r in zip(hyps, refs)],
    }
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        scorer = rouge_scorer.RougeScorer([t])
        peers[t] = lambda scorer=scorer: [scorer.score(r, h) for h, r in zip(hyps, refs)]
    # warm caches on both sides (stemmer, WordNet lookups) so steady-state throughput is compared; for METEOR
    # this fills our synonym cache with exactly the timed words, so its cold figure is reported as well
    for name in peers:
        compute_metric(name, hyps, refs)
        peers[name]()
    rows = []
    for name, peer in peers.items():
        ours_s, peer_s = timed_pair(lambda: compute_metric(name, hyps, refs), peer, args.repeats)
        label = "meteor (warm: synonym cache filled on these pairs)" if name == "meteor" else name
        rows.append((label, len(hyps), len(hyps) / ours_s, len(hyps) / peer_s))
        if name == "meteor":
            rows.append(("meteor (cold: synonym caches emptied before each run)", len(hyps),
                         *meteor_cold(hyps, refs, args.repeats)))

    bh, br = hyps[:args.bert_n], refs[:args.bert_n]
    path = str(default_encoder_path())
    model, tok = load_encoder(path)
    scorer = bert_score.BERTScorer(model_type=path, num_layers=6)
    compute_metric("bertscore", bh[:8], br[:8])
    scorer.score(bh[:8], br[:8])
    ours_s, peer_s = timed_pair(lambda: compute_metric("bertscore", bh, br, model=model, tokenizer=tok),
                                lambda: scorer.score(bh, br), args.repeats)
    rows.append(("bertscore", len(bh), len(bh) / ours_s, len(bh) / peer_s))

    print(f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print("| metric | items | ours items/s | peer items/s | ours/peer | peer |")
    print("| --- | --- | --- | --- | --- | --- |")
    peer_names = {"bleu": "sacrebleu", "chrf": "sacrebleu", "levenshtein": "rapidfuzz (C++)", "meteor": "nltk",
                  "bertscore": "bert-score"}
    for name, n, ours, peer in rows:
        peer_name = peer_names.get(name.split(" ")[0], "rouge-score")
        print(f"| {name} | {n} | {ours:,.0f} | {peer:,.0f} | {ours / peer:.2f} | {peer_name} |")


if __name__ == "__main__":
    main()
