"""The production loop, closed: serve an A/B test, log it, collect feedback, read the test out, export the
feedback as preference pairs, run a DPO round on them, and serve the new model as the next B arm.

    result = closed_loop(sft_dir, aligned_dir, out_dir, questions)

1. ``lmstack serve``'s app with arm A (``a_dir``, the SFT model) and arm B (``b_dir``, the aligned model), sticky
   per user, interactions logged to ``out/log.db`` (a :mod:`lmstack.monitor` SQLite store);
2. simulated users (``users`` x ``per_user`` chat requests through the official ``openai`` client, a few at a
   time so they share the running batch) ask the questions;
3. simulated feedback: each answer is judged by ROUGE-L F1 against the question's reference answer, thumbs up
   above ``judge_threshold`` (a seeded ``flip`` share of thumbs is flipped, as people disagree), posted to
   ``/v1/feedback`` -- the same route the chat page uses (``judge_fn`` replaces the judge);
4. the readout: :func:`lmstack.monitor.ab.decide` on the logged rows and their thumbs (SRM check, fixed-horizon
   and always-valid sequential tests, a recommendation);
5. the export: thumbs up and down on answers to the same question become DPO pairs
   (:func:`lmstack.monitor.feedback.write_alignment_data`), and one DPO round (:func:`lmstack.align.dpo.dpo`)
   starts from the B model;
6. the new model is served as the B arm beside A, and a second, shorter round of traffic is judged the same way.

Everything is seeded: the same inputs give the same pairs and the same new model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError

EXPERIMENT = "sft-vs-aligned"


def judge(answer: str, reference: str) -> float:
    """ROUGE-L F1 of an answer against the reference answer (lmstack.eval's ROUGE)."""
    from lmstack.eval.metrics.ngram import rouge_prf

    return rouge_prf("rougeL", reference, answer)[2]


def _traffic(url: str, questions: Sequence[dict[str, str]], users: int, per_user: int, max_tokens: int,
             user_prefix: str, seed: int, workers: int = 8) -> list[dict[str, Any]]:
    """Each simulated user asks ``per_user`` questions (a seeded draw); returns (id, user, question, answer)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    rng = random.Random(seed)
    jobs = [(f"{user_prefix}{u}", questions[rng.randrange(len(questions))]) for u in range(users)
            for _ in range(per_user)]

    def ask(job: tuple[str, dict[str, str]]) -> dict[str, Any]:
        user, q = job
        r = client.chat.completions.create(model="served", messages=[{"role": "user", "content": q["prompt"]}],
                                           max_tokens=max_tokens, temperature=0, user=user)
        return {"id": r.id, "user": user, "prompt": q["prompt"], "reference": q["reference"],
                "answer": r.choices[0].message.content or ""}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(ask, jobs))


def _feedback(url: str, answers: list[dict[str, Any]], threshold: float, flip: float, seed: int,
              judge_fn: Callable[[str, str], float]) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(timeout=30) as http:
        for a in answers:
            a["score"] = judge_fn(a["answer"], a["reference"])
            up = a["score"] > threshold
            if rng.random() < flip:
                up = not up
            a["thumb"] = 1 if up else -1
            r = http.post(url + "/v1/feedback", json={"interaction_id": a["id"], "kind": "thumb",
                                                      "value": a["thumb"], "user": a["user"]})
            if r.status_code != 200:
                raise LmstackError(f"feedback on {a['id']} was refused: {r.status_code} {r.text[:200]}")


def _readout(store: Any, since: float | None = None) -> dict[str, Any]:
    from lmstack.monitor.ab import decide
    from lmstack.monitor.rows import attach_feedback
    from lmstack.monitor.store import interaction_to_dict

    rows = [interaction_to_dict(r) for r in store.rows(since=since)]
    rows = attach_feedback(rows, store.feedback(since=since))
    return decide(rows, "thumbs_up", kind="rate", shares={"A": 0.5, "B": 0.5}, look_every=10)


def closed_loop(a_dir: str | Path, b_dir: str | Path, out: str | Path, questions: Sequence[dict[str, str]], *,
                users: int = 40, per_user: int = 3, second_users: int = 20, max_tokens: int = 32,
                judge_threshold: float | None = None, flip: float = 0.1, dpo_steps: int = 20,
                dpo_lr: float = 5e-4, seed: int = 0, judge_fn: Callable[[str, str], float] = judge
                ) -> tuple[dict[str, Any], str]:
    """Run the loop of the module docstring; ``questions`` are ``{"prompt", "reference"}`` dicts. Returns the
    results (readouts, pair counts, the DPO round's held-out figures, the second round's thumbs-up rates) and a
    markdown report. An answer gets a thumb up when ``judge_fn(answer, reference)`` is above ``judge_threshold``
    (None: the median score of the first round, so about half the thumbs are up)."""
    import time

    from lmstack.align.config import DPOConfig
    from lmstack.align.dpo import dpo
    from lmstack.config import from_dict
    from lmstack.infer.text import load_run
    from lmstack.monitor.feedback import write_alignment_data
    from lmstack.monitor.store import open_store
    from lmstack.runs import atomic_write_json
    from lmstack.serve.app import create_app
    from lmstack.serve.speedrun import serve_in_main

    if len(questions) < 2:
        raise LmstackError("closed loop: give at least 2 questions ({'prompt', 'reference'} each)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.db").unlink(missing_ok=True)         # a rerun starts from an empty log: same inputs, same pairs
    store = open_store(out / "log.db")
    try:
        a_model, a_tok = load_run(a_dir, prefer=("chat_model", "pretrain"))
        b_model, b_tok = load_run(b_dir, prefer=("chat_model", "pretrain"))
        app = create_app(a_model, a_tok, "served", label="A:" + Path(a_dir).name, log_store=store,
                         candidate=(b_model, b_tok, "B:" + Path(b_dir).name), experiment=EXPERIMENT, max_batch=8,
                         start_engines=False)

        def first_round(url: str) -> tuple[list[dict[str, Any]], float]:
            answers = _traffic(url, questions, users, per_user, max_tokens, "user-", seed)
            scores = sorted(judge_fn(a["answer"], a["reference"]) for a in answers)
            threshold = judge_threshold if judge_threshold is not None else scores[len(scores) // 2]
            _feedback(url, answers, threshold, flip, seed, judge_fn)
            return answers, threshold

        _, threshold = serve_in_main(app, first_round)
        first = _readout(store)
        counts = write_alignment_data(store, dpo=out / "pairs.jsonl", kto=out / "kto.jsonl")
        if counts["dpo"] < 2:   # nothing to learn from: say so, and serve nothing new
            note = (f"the feedback gave {counts['dpo']} preference pairs (thumbs up and down on the same question), "
                    f"too few for a DPO round: more users or questions, or answers that differ")
            results = {"threshold": threshold, "first": _strip(first), "pairs": counts["dpo"],
                       "kto_rows": counts["kto"], "dpo_round": {"skipped": note}}
            atomic_write_json(out / "loop.json", results)
            return results, _report_first(results, users, per_user) + f"\nNo DPO round: {note}.\n"
        tok = str(b_dir) if (Path(b_dir) / "tokenizer.json").is_file() else str(Path(b_dir).parent)
        cfg = from_dict(DPOConfig, {"run_dir": str(out / "dpo_round"), "base": str(b_dir), "tokenizer": tok,
                                    "method": "full", "steps": dpo_steps, "batch_size": min(8, counts["dpo"]),
                                    "lr": dpo_lr, "beta": 0.1, "log_every": 5, "warmup_steps": 2, "seed": seed,
                                    "data": {"train": [str(out / "pairs.jsonl")], "valid_fraction": 0.2,
                                             "max_len": 192}})
        round_result = dpo(cfg)
        new_dir = Path(cfg.run_dir)
        n_model, n_tok = load_run(new_dir, prefer=("chat_model", "pretrain"))
        since = time.time()
        app2 = create_app(a_model, a_tok, "served", label="A:" + Path(a_dir).name, log_store=store,
                          candidate=(n_model, n_tok, "B:" + new_dir.name), experiment=EXPERIMENT + "-2",
                          max_batch=8, start_engines=False)

        def second_round(url: str) -> list[dict[str, Any]]:
            second = _traffic(url, questions, second_users, per_user, max_tokens, "next-user-", seed + 1)
            _feedback(url, second, threshold, flip, seed + 1, judge_fn)
            return second

        second = serve_in_main(app2, second_round)
        second_rows = store.rows(since=since)
        second_readout = _readout(store, since)
    finally:
        store.close()
    by_arm = {r.id: (r.arm, r.model) for r in second_rows}
    up = {arm: [a["thumb"] > 0 for a in second if by_arm.get(a["id"], (None,))[0] == arm] for arm in ("A", "B")}
    results = {"threshold": threshold, "first": _strip(first), "pairs": counts["dpo"], "kto_rows": counts["kto"],
               "dpo_round": {k: round_result[k] for k in ("before", "after") if k in round_result},
               "new_model": str(new_dir), "second": _strip(second_readout),
               "second_models": sorted({m for _, m in by_arm.values()}),
               "second_up_rate": {arm: (sum(v) / len(v) if v else None) for arm, v in up.items()}}
    atomic_write_json(out / "loop.json", results)
    return results, _report(results, users, per_user, second_users)


def _strip(readout: dict[str, Any]) -> dict[str, Any]:
    keep = ("recommendation", "reasoning", "srm", "arms", "fixed_horizon", "sequential")
    return json.loads(json.dumps({k: readout[k] for k in keep if k in readout}, default=str))


def _arms(readout: dict[str, Any]) -> str:
    a = readout.get("arms", {})
    parts = [f"{name} {v['rate']:.2f} (n={v['n']})" for name, v in a.items() if v.get("rate") is not None]
    return ", ".join(parts) or "-"


def _row(name: str, ro: dict[str, Any]) -> str:
    fixed, seq = ro.get("fixed_horizon", {}), ro.get("sequential", {})
    return (f"| {name} | {_arms(ro)} | {ro.get('srm', {}).get('p_value', float('nan')):.3g} | "
            f"{fixed.get('p_value', float('nan')):.3g} | {seq.get('p_value', float('nan')):.3g} | "
            f"{ro.get('recommendation', '-')} |")


def _report_first(r: dict[str, Any], users: int, per_user: int) -> str:
    lines = [(f"Arm A is the SFT model, arm B the aligned one, behind one served name, sticky per user. {users} "
             f"simulated users x {per_user} questions; each answer judged by ROUGE-L F1 against the reference "
             f"answer, thumbs up above {r['threshold']:.3f} (10% of thumbs flipped), posted to `/v1/feedback`."), "",
             "| round | thumbs-up rate per arm | SRM p | fixed-horizon p | mSPRT p | recommendation |",
             "|---|---|---:|---:|---:|---|", _row("1: SFT vs aligned", r["first"])]
    return "\n".join(lines) + "\n"


def _report(r: dict[str, Any], users: int, per_user: int, second_users: int) -> str:
    before, after = r["dpo_round"].get("before", {}), r["dpo_round"].get("after", {})
    lines = [_report_first(r, users, per_user).rstrip("\n"), _row("2: SFT vs the new model", r["second"])]
    lines += ["", (f"Feedback exported as **{r['pairs']} DPO pairs** (thumbs up vs down on the same question) and "
                  f"{r['kto_rows']} KTO rows; one DPO round on them from the aligned model: held-out implicit-reward "
                  f"accuracy {before.get('val_accuracy', float('nan')):.3f} -> "
                  f"{after.get('val_accuracy', float('nan')):.3f}. The new model then served as arm B for "
                  f"{second_users} more users ({', '.join(r['second_models'])}).")]
    return "\n".join(lines) + "\n"
