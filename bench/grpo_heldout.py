"""Does GRPO raise held-out accuracy on the speedrun model? The speedrun's GRPO stage, over several seeds, and
the two ablations that explain its design, one table.

Each row is one run of :func:`lmstack.align.grpo.speedrun_grpo` on the same pre-trained base (a speedrun's
``RUN/pretrain``): a supervised warm-up on the one-step facts and 300 train-side 3-term problems, then GRPO;
greedy exact match on the held-out problems before and after, with the paired change (95% bootstrap interval,
permutation p). The seed moves the warm-up, the split and the sampler, so rows differ in where they start.

- ``default``: the stage as the speedrun runs it (RL prompts are train-side problems the warm-up never saw,
  lr 2e-5, 16 prompts x G=8 per buffer, 128 steps);
- ``same prompts``: RL on the warm-up's own 300 problems (``train_offset = 0``), the design before session 6;
- ``lr 1e-4, 8 prompts``: the earlier optimiser settings.

    .venv/bin/python bench/grpo_heldout.py            # runs/speedrun/pretrain; ~6 minutes on 2 cores
    .venv/bin/python bench/grpo_heldout.py --base runs/speedrun/pretrain --seeds 1337 --no-ablations

Not timed against a peer: the figure of merit is the held-out change. The stage's own time is in its report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ABLATIONS = {
    "same prompts": {"arithmetic": {"train_offset": 0, "train_items": 300}},
    "lr 1e-4, 8 prompts": {"lr": 1e-4, "rollout": {"prompts": 8}},
}


def one_run(base: Path, work: Path, seed: int, overrides: dict) -> dict:
    from lmstack.align.grpo import speedrun_grpo

    run = work / f"run_{seed}_{len(list(work.iterdir()))}"
    run.mkdir(parents=True)
    (run / "pretrain").symlink_to(base.resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    res, _ = speedrun_grpo(run, seed=seed, **json.loads(json.dumps(overrides)))
    return {"seconds": time.perf_counter() - t0, **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="a pre-trained speedrun model folder (default runs/speedrun/pretrain)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 7, 42])
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    base = Path(args.base or Path(__file__).resolve().parents[1] / "runs" / "speedrun" / "pretrain")
    if args.base is None and not (base / "model_config.json").is_file():
        print(f"[bench] skipped: no speedrun model at {base}; run `make run` first or pass --base RUN/pretrain",
              file=sys.stderr)
        return 0
    if not (base / "model_config.json").is_file():
        print(f"error: --base: {base} is not an lmstack model folder (no model_config.json); run `lmstack speedrun` "
              f"first and pass RUN/pretrain", file=sys.stderr)
        return 2
    plan = [("default", s, {}) for s in args.seeds]
    if not args.no_ablations:
        plan += [(name, args.seeds[0], ov) for name, ov in ABLATIONS.items()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo_heldout_") as tmp:
        work = Path(tmp)
        for name, seed, ov in plan:
            r = one_run(base, work, seed, ov)
            p = r["paired"]["strict"]
            rows.append({"setting": name, "seed": seed, "before": r["before"]["exact_match_strict"],
                         "after": r["after"]["exact_match_strict"],
                         "lenient_before": r["before"]["exact_match_lenient"],
                         "lenient_after": r["after"]["exact_match_lenient"], "delta": p["delta"], "ci95": p["ci95"],
                         "p_value": p["p_value"], "right": p["turned_right"], "wrong": p["turned_wrong"],
                         "items": r["heldout_items"], "rl_prompts": r["train_prompts"],
                         "reward_first": r["reward_first"], "reward_last": r["reward_last"],
                         "seconds": round(r["seconds"], 1)})
            print(f"[bench] {name} seed {seed}: {rows[-1]['before']:.3f} -> {rows[-1]['after']:.3f}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print(f"GRPO stage on {base}, held-out 3-term arithmetic, greedy, strict exact match (lenient in brackets)\n")
    print("| setting | seed | RL prompts | before | after | change (95% CI) | p | turned right / wrong | rollout reward first -> last | s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['seed']} | {r['rl_prompts']} | {r['before']:.3f} ({r['lenient_before']:.3f}) | "
              f"{r['after']:.3f} ({r['lenient_after']:.3f}) | {r['delta']:+.3f} [{r['ci95'][0]:+.3f}, "
              f"{r['ci95'][1]:+.3f}] | {r['p_value']:.3f} | {r['right']} / {r['wrong']} | "
              f"{r['reward_first']:.2f} -> {r['reward_last']:.2f} | {r['seconds']:.0f} |")
    default = [r for r in rows if r["setting"] == "default"]
    if default:
        mean = sum(r["delta"] for r in default) / len(default)
        print(f"\ndefault: mean change {mean:+.3f} over {len(default)} seeds; "
              f"{sum(r['delta'] > 0 for r in default)} of {len(default)} positive")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
