"""SummEval meta-evaluation: summary-level Spearman / Kendall of ROUGE-1/2/L and BERTScore with each
human dimension (coherence, consistency, fluency, relevance), next to the G-Eval paper's Table 1.

The shared copy of SummEval (PPairS flattening) has no reference summaries, so the metrics compare
each summary with its **source article** (the "document as reference" setting); the paper's figures
are reference-based. Expect different numbers, and read the comparison with that in mind.

    .venv/bin/python bench/summeval.py [--data ../shared/data/eval/summeval.jsonl] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.eval import compute_metric  # noqa: E402
from lmstack.eval.correlate import correlate_table, table_markdown  # noqa: E402

DIMS = ("coherence", "consistency", "fluency", "relevance")
# G-Eval (Liu et al. 2023) Table 1, summary-level (Spearman rho, Kendall tau), reference-based metrics.
PAPER = {
    "rouge1": {"coherence": (0.167, 0.126), "consistency": (0.160, 0.130), "fluency": (0.115, 0.094),
               "relevance": (0.326, 0.252)},
    "rouge2": {"coherence": (0.184, 0.139), "consistency": (0.187, 0.155), "fluency": (0.159, 0.128),
               "relevance": (0.290, 0.219)},
    "rougeL": {"coherence": (0.128, 0.099), "consistency": (0.115, 0.092), "fluency": (0.105, 0.084),
               "relevance": (0.311, 0.237)},
    "bertscore": {"coherence": (0.284, 0.211), "consistency": (0.110, 0.090), "fluency": (0.193, 0.158),
                  "relevance": (0.312, 0.243)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "summeval.jsonl"))
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")][:args.limit]
    summaries = [r["summary"] for r in rows]
    articles = [r["article"] for r in rows]
    groups = [r["article_id"] for r in rows]
    human = {d: [float(r[d]) for r in rows] for d in DIMS}
    scores, seconds = {}, {}
    for name in ("rouge1", "rouge2", "rougeL", "bertscore"):
        t0 = time.perf_counter()
        opts = {"use_stemmer": True} if name.startswith("rouge") else {}
        scores[name] = compute_metric(name, summaries, articles, **opts).per_item
        seconds[name] = time.perf_counter() - t0
    table = correlate_table(scores, human, groups=groups, level="summary")
    print(f"SummEval: {len(rows)} summaries, {len(set(groups))} articles; metric vs source article; "
          f"summary level; cells: ours rho / tau (paper rho / tau, reference-based)")
    print(table_markdown(table, reference=PAPER))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
