"""Online RL cost: where GRPO's time goes (rollouts vs updates) and what the batched engine buys for rollouts.

1. Rollout throughput: ``P`` prompts x ``G`` samples of exactly ``N`` new tokens (EOS masked, so both sides do
   the same work), sampled by the batched engine in one call (:func:`lmstack.align.rollout.generate_rollouts`:
   ``complete_batch``, left-padded, KV-cached) vs one sequence at a time (``complete`` per sample, the
   same engine at batch 1). Interleaved, median of ``--repeats``; generated tokens/s and the ratio.
2. A GRPO run (:func:`lmstack.align.online.run_online`, synthetic arithmetic, verifiable rewards) of
   ``--steps`` steps: seconds in rollouts (generation + rewards + old/reference log-probs) vs updates
   (forward/backward/optimizer), the rollout share, rollout tokens/s inside the loop.

The model is ``--base`` (e.g. a speedrun's ``pretrain/`` or a fine-tuned run) or, by default, a tiny random
decoder (the speedrun's ``tiny`` preset: 4 layers, d128) with a BPE trained on arithmetic text: the timing
does not depend on what the weights know.

    .venv/bin/python bench/align_rl.py                      # ~1-2 minutes on 2 CPU cores
    .venv/bin/python bench/align_rl.py --base runs/speedrun/pretrain --steps 16 --repeats 5

``grpo_rows(...)`` returns the rows (dicts) for bench/align.py to fold into its table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_base(folder: Path) -> Path:
    from lmstack.align.rl_data import arithmetic_items
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    items = arithmetic_items(150, split="train", max_operand=20)
    tok = train_bpe([it["question"] + " " + it["solution"] for it in items], 512)
    torch.manual_seed(0)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size)), folder)
    tok.save(folder)
    return folder


def rollout_throughput(base: Path, prompts: int, samples: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    from generate import median_times

    from lmstack.align.rl_data import arithmetic_items, prompt_ids
    from lmstack.align.rollout import generate_rollouts
    from lmstack.infer.config import GenerationConfig
    from lmstack.infer.text import chat_config, complete, load_run

    model, tok = load_run(base)
    items = arithmetic_items(prompts, split="train", max_operand=20)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, seed=0,
                           num_return_sequences=samples)
    one = chat_config(tok, cfg.replace(num_return_sequences=1))
    ids = [prompt_ids(tok, it) for it in items]

    def batched() -> None:
        generate_rollouts(model, tok, items, cfg)

    def single() -> None:
        for p in ids:
            for s in range(samples):
                complete(model, tok, p, one.replace(seed=s))

    with torch.inference_mode():
        t_batch, t_one = median_times([batched, single], repeats)
    n = prompts * samples * new_tokens
    return {"bench": "rollout tokens/s", "prompts": prompts, "samples": samples, "new_tokens": new_tokens,
            "batched_tok_s": round(n / t_batch, 1), "one_at_a_time_tok_s": round(n / t_one, 1),
            "speedup": round(t_one / t_batch, 2), "batched_s": round(t_batch, 3), "one_at_a_time_s": round(t_one, 3)}


def grpo_split(base: Path, work: Path, steps: int, prompts: int, samples: int, new_tokens: int) -> dict[str, Any]:
    from lmstack.align.online import run_online
    from lmstack.align.rl_config import OnlineConfig
    from lmstack.config import from_dict

    cfg = from_dict(OnlineConfig, {
        "run_dir": str(work / "grpo"), "base": str(base), "steps": steps, "minibatch_size": prompts * samples // 2,
        "lr": 1e-4, "rollout": {"prompts": prompts, "num_samples": samples, "max_new_tokens": new_tokens},
        "data": {"arithmetic": {"max_operand": 20, "train_items": 64, "heldout_items": 8}, "eval_items": 8}})
    r = run_online(cfg)
    t = r["timing"]
    return {"bench": "GRPO time split", "steps": steps, "rollouts": r["rollouts"], "buffer": prompts * samples,
            "seconds": t["seconds"], "rollout_s": t["rollout_s"], "generate_s": t["generate_s"],
            "score_s": t["score_s"], "update_s": t["update_s"], "eval_s": t["eval_s"],
            "rollout_fraction": t["rollout_fraction"], "rollout_tok_s_in_loop": t["rollout_tokens_per_s"]}


def grpo_rows(base: str | Path | None = None, work: str | Path | None = None, steps: int = 8, prompts: int = 8,
              samples: int = 8, new_tokens: int = 24, repeats: int = 3) -> list[dict[str, Any]]:
    """The two rows (rollout throughput batched vs one at a time; the GRPO time split)."""
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(work) if work else Path(tmp)
        base_dir = Path(base) if base else tiny_base(work_dir / "base")
        return [rollout_throughput(base_dir, prompts, samples, new_tokens, repeats),
                grpo_split(base_dir, work_dir, steps, prompts, samples, new_tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rows = grpo_rows(a.base, a.work, a.steps, a.prompts, a.samples, a.new_tokens, a.repeats)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
