"""Benchmark: end-to-end answers on SQuAD v1.1 dev, extractive and generated, and "I don't know" training.

Articles are split by ``lmstack.rag.squad.squad_article_split`` (``split_articles``: titles ranked by a seeded
hash, 25 % eval; the figures in bench/RESULTS.md were taken with the earlier threshold-on-hash split): everything
trained or calibrated uses the train articles, every figure is on eval-article questions.

- **Extractive path**: BM25 over all 2,067 paragraphs (one chunk each), top 5; ``answer()`` (one sentence,
  cited) scored with SQuAD EM/F1 against the gold answers (a sentence is longer than a SQuAD span, so EM is
  ~0 by construction; F1 and "gold answer inside the answer" say more). Unanswerable: the same questions with
  their paragraph removed from the index (a filter at search time); abstention at ``min_score`` = the 10th
  percentile of the best BM25 score of train-article questions.
- **Generated path**: the real pretrained stories260K (karpathy's tinyllamas, 260K parameters, 512-token
  window) with lmstack's chat tokens added (``rag.idk.with_chat_tokens``); contexts are 2 short sentences
  (<= 150 characters) from a BM25 sentence index of the same articles (``rag.idk.build_idk_examples``):
  answerable = the gold sentence + the best other-paragraph sentence, unanswerable = the gold paragraph
  removed (the 2 best other-paragraph sentences). Generation is greedy, checked by ``check_generated``
  (span match; no judge). Measured for the base, after SFT (``lmstack.finetune``, full) and after SFT + DPO
  (``lmstack.align.dpo``, full) on train-article rows: abstention precision/recall and EM/F1 (answerable).

    .venv/bin/python bench/rag_answers.py                        # ~15 minutes on 2 busy CPU cores
    .venv/bin/python bench/rag_answers.py --questions 100 --sft-steps 100 --dpo-steps 40
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from lmstack.rag import BM25Index, WholeChunker, chunk_documents
from lmstack.rag.answer import GenerateConfig, answer, generate_answers
from lmstack.rag.idk import IdkConfig, build_idk_examples, dpo_rows, score_answers, sft_rows, with_chat_tokens, write_jsonl
from lmstack.rag.metrics import abstention_precision_recall, squad_exact_match, squad_f1
from lmstack.rag.squad import read_squad, squad_article_split, squad_paragraphs

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "data" / "rag" / "squad_dev-v1.1.json"
MODEL = ROOT.parent / "shared" / "data" / "models" / "stories260K"


def extractive(train_articles, eval_articles, all_articles, n: int, seed: int, k: int) -> dict[str, float]:
    from lmstack.rag.answer import strip_citations

    docs, _ = squad_paragraphs(all_articles)
    index = BM25Index()
    index.add(chunk_documents(docs, WholeChunker()))
    _, train_q = squad_paragraphs(train_articles)
    _, eval_q = squad_paragraphs(eval_articles)
    rng = random.Random(seed)
    calib = rng.sample(train_q, min(500, len(train_q)))
    best = [h[0].score if (h := index.search(q.question, 1)) else 0.0 for q in calib]
    min_score = float(np.percentile(best, 10))
    qs = rng.sample(eval_q, min(n, len(eval_q)))
    t0 = time.perf_counter()
    em, f1, inside, abst, unans = [], [], [], [], []
    for q in qs:
        a = answer(q.question, index.search(q.question, k), min_score=min_score, max_sentences=1)
        pred = "" if a.abstained else strip_citations(a.text)
        em.append(squad_exact_match(pred, q.answers) if pred else 0.0)
        f1.append(squad_f1(pred, q.answers))
        inside.append(any(g.lower() in pred.lower() for g in q.answers) if pred else False)
        abst.append(a.abstained)
        unans.append(False)
        hits = index.search(q.question, k, lambda c, d=q.doc_id: c.doc_id != d)  # the paragraph removed
        abst.append(answer(q.question, hits, min_score=min_score, max_sentences=1).abstained)
        unans.append(True)
    pr = abstention_precision_recall(abst, unans)
    return {"em": float(np.mean(em)), "f1": float(np.mean(f1)), "inside": float(np.mean(inside)),
            "precision": pr["precision"], "recall": pr["recall"], "abstained": pr["abstained"], "min_score": min_score, "n": len(qs),
            "seconds": time.perf_counter() - t0}


def generated(run: Path, examples, batch: int) -> tuple[dict[str, float], float]:
    from lmstack.infer.text import load_run

    model, tok = load_run(run)
    t0 = time.perf_counter()
    answers = generate_answers([e.question.question for e in examples], [e.hits for e in examples], model, tok,
                               GenerateConfig(max_new_tokens=24), batch_size=batch)
    return score_answers(examples, answers), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", type=Path, default=SQUAD)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--questions", type=int, default=200, help="eval-article questions (each also unanswerable)")
    ap.add_argument("--train-questions", type=int, default=None, help="train-article questions (default: all)")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dpo-lr", type=float, default=3e-4, help="1e-3 collapsed stories260K to one reply; 1e-4 moved nothing")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_rag_answers")
    args = ap.parse_args()
    if not args.squad.is_file() or not args.model.is_dir():
        sys.exit(f"error: {args.squad} or {args.model} not found (see ../shared/data/README.md)")
    from lmstack.align.config import DPOConfig
    from lmstack.align.dpo import dpo
    from lmstack.config import from_dict
    from lmstack.finetune import FinetuneConfig, finetune

    articles = read_squad(args.squad)
    train_a, eval_a = squad_article_split(articles)
    ext = extractive(train_a, eval_a, articles, args.questions, args.seed, args.k)
    print(f"[bench] extractive: {ext}", file=sys.stderr, flush=True)

    held = build_idk_examples(eval_a, IdkConfig(max_questions=args.questions, seed=args.seed))
    train = build_idk_examples(train_a, IdkConfig(max_questions=args.train_questions, seed=args.seed + 1))
    n_valid = min(100, len(train) // 5)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(sft_rows(train[n_valid:]), out / "sft_train.jsonl")
    write_jsonl(sft_rows(train[:n_valid]), out / "sft_valid.jsonl")
    write_jsonl(dpo_rows(train[n_valid:]), out / "dpo_train.jsonl")
    # DPO's held-out pairs are the eval-article examples: only scored (before = the SFT model, after = DPO),
    # never trained on, so its log-likelihood preference figures are on the same questions as the table
    write_jsonl(dpo_rows(held), out / "dpo_valid.jsonl")
    base = with_chat_tokens(args.model, out / "base")
    rows = {}
    rows["stories260K (no IDK training)"] = generated(base, held, 16)
    print(f"[bench] base: {rows}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    finetune(from_dict(FinetuneConfig, {
        "run_dir": str(out / "sft"), "base": str(base), "method": "full", "steps": args.sft_steps,
        "batch_size": args.batch, "lr": 2e-3, "warmup_steps": 10, "log_every": 20, "n_samples": 1, "device": "cpu",
        "seed": args.seed, "data": {"train": [str(out / "sft_train.jsonl")], "valid": [str(out / "sft_valid.jsonl")],
                                    "max_len": 512}}))
    sft_s = time.perf_counter() - t0
    rows["+ SFT"] = generated(out / "sft", held, 16)
    print(f"[bench] sft: {rows['+ SFT']}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    dres = dpo(from_dict(DPOConfig, {
        "run_dir": str(out / "dpo"), "base": str(out / "sft"), "method": "full", "steps": args.dpo_steps,
        "batch_size": args.batch, "lr": args.dpo_lr, "beta": 0.1, "warmup_steps": 5, "log_every": 10, "device": "cpu",
        "seed": args.seed, "data": {"train": [str(out / "dpo_train.jsonl")], "valid": [str(out / "dpo_valid.jsonl")],
                                    "max_len": 512,
                                    # the reference log-probs are computed once for every row read: read no
                                    # more rows than the steps use
                                    "max_examples": args.dpo_steps * args.batch}}))
    dpo_s = time.perf_counter() - t0
    rows["+ SFT + DPO"] = generated(out / "dpo", held, 16)

    def f(x: float, n: int) -> str:
        return "n/a" if n == 0 else f"{x:.3f}"

    n_ans = sum(e.answerable for e in held)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other "
             f"jobs), Python {platform.python_version()}; command: `{' '.join(['bench/rag_answers.py', *sys.argv[1:]])}`",
             "", f"SQuAD v1.1 dev, {len(train_a)} train / {len(eval_a)} eval articles (squad_article_split). "
             f"Extractive: {ext['n']} eval questions, BM25 top {args.k} of 2,067 paragraphs, abstention at "
             f"min_score {ext['min_score']:.2f} (10th percentile of train-article best scores); each question "
             f"is asked twice, with its paragraph in the index and removed. Generated: {n_ans} eval questions, "
             f"each answerable (gold sentence + 1 distractor) and unanswerable (paragraph removed: 2 other "
             f"sentences); SFT on {len(train) - n_valid} train-article rows ({args.sft_steps} steps x "
             f"{args.batch}, {sft_s:.0f} s), DPO {args.dpo_steps} steps x {args.batch} pairs, lr {args.dpo_lr:g} "
             f"({dpo_s:.0f} s). On the {len(held)} eval-article pairs (chosen = the right behaviour, rejected = the "
             f"opposite) the model's own log-likelihood prefers the chosen reply on "
             f"{dres['before']['val_logp_accuracy']:.1%} (SFT) -> {dres['after']['val_logp_accuracy']:.1%} (SFT + DPO); "
             f"DPO's implicit-reward accuracy {dres['after']['val_accuracy']:.3f}, margin "
             f"{dres['after']['val_margin']:.4f}.", "",
             "Abstention: precision = share of abstentions that were on unanswerable questions, recall = share "
             "of unanswerable questions abstained on; \"model\" counts the model's own \"I don't know\", "
             "\"verified\" also the replies that verification rejected (no sentence supported by its cited "
             "source); \"wrong IDK\" = verified abstention rate on answerable questions.", "",
             "| path | EM | F1 | model IDK precision | model IDK recall | verified precision | verified recall | "
             "wrong IDK | s |", "|---|---|---|---|---|---|---|---|---|",
             f"| extractive, BM25 top {args.k} (gold inside the sentence: {ext['inside']:.3f}) | {ext['em']:.3f} | "
             f"{ext['f1']:.3f} | - | - | {f(ext['precision'], ext['abstained'])} | {ext['recall']:.3f} | - | "
             f"{ext['seconds']:.1f} |"]

    for name, (m, secs) in rows.items():
        lines.append(f"| generated, {name} | {m['em']:.3f} | {m['f1']:.3f} | "
                     f"{f(m['model_precision'], m['model_abstained'])} | {m['model_recall']:.3f} | "
                     f"{f(m['precision'], m['abstained'])} | {m['recall']:.3f} | {m['abstain_rate_answerable']:.3f} | "
                     f"{secs:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
