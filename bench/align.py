"""DPO train steps, ours vs trl's DPOTrainer: tokens/s and peak memory, full fine-tuning and LoRA.

Same model, same tokens, same step:

- model: the real Llama checkpoint ``../shared/data/models/stories260K`` (5 layers, d64, vocab 512), loaded by
  ``lmstack.model.hf.load`` for us and ``AutoModelForCausalLM`` for trl;
- data: seeded random token pairs (``--prompt`` prompt tokens, ``--response`` tokens for each reply) given to
  both already tokenized (trl's ``DataCollatorForPreference`` rows ``prompt_ids``/``chosen_ids``/``rejected_ids``;
  its text preparation is skipped, so both score identical sequences);
- step: sigmoid DPO, beta 0.1, live reference forward in the step (no precomputed log-probs), AdamW, batch
  ``--batch`` pairs, fp32 on CPU (or the device given); full: a frozen reference copy; LoRA r=8 on q/k/v/o and
  the MLP: the reference is the base with the adapter disabled (ours ``adapters_disabled``, trl's peft path).

Each (implementation, method) runs in a fresh process, so its peak memory (CUDA max allocated, or the
process's peak RSS on CPU) is its own. tokens/s = tokens per step (prompt + reply, chosen and rejected) /
median step time over the steps after the first two.

    .venv/bin/python bench/align.py                       # ~6 minutes on 2 CPU cores
    .venv/bin/python bench/align.py --steps 30 --batch 16
    .venv/bin/python bench/align.py --rm-hh                # + the HH-RLHF reward model of docs/align.md

``dpo_rows(...)`` returns the table rows; other alignment benchmarks (GRPO) append their own sections.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "data" / "models" / "stories260K"


def _pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    import random

    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731  (0-2: unk/bos/eos)
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(response), "rejected_ids": ids(response)} for _ in range(n)]


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(method: str, args: argparse.Namespace) -> dict:
    import torch

    from lmstack.align.config import DPOConfig
    from lmstack.align.data import PairExample, collate_pairs
    from lmstack.align.dpo import make_loss_fn
    from lmstack.align.offline import frozen_copy
    from lmstack.finetune.lora import LoraConfig, add_lora
    from lmstack.finetune.sft import Example
    from lmstack.model import hf
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer

    torch.manual_seed(0)
    model = hf.load(str(args.model)).float()
    ref = frozen_copy(model) if method == "full" else None
    if method == "lora":
        add_lora(model, LoraConfig(r=8, alpha=16, targets=["attention", "mlp"]))
    rows = _pairs(args.batch, args.prompt, args.response, model.config.vocab_size)

    def example(p: list[int], r: list[int]) -> Example:
        ids = p + r
        return Example(ids[:-1], [-100] * (len(p) - 1) + r)

    pairs = [PairExample(example(r["prompt_ids"], r["chosen_ids"]), example(r["prompt_ids"], r["rejected_ids"]))
             for r in rows]
    batch = collate_pairs(pairs)

    class Loader:
        def next_batch(self):
            return batch

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    cfg = DPOConfig(base="x", method=method, beta=0.1)
    times: list[float] = []
    task = Task(model=model, loader=Loader(), eval_batches=lambda: [], loss_fn=make_loss_fn(cfg, ref),
                evaluate=lambda m: {}, save_weights=lambda m, f: None)
    tcfg = TrainConfig(run_dir=str(Path(args.work) / f"ours_{method}"), steps=args.steps, batch_size=args.batch,
                       log_every=args.steps, sample_prompts=[], device=args.device, dtype="fp32", peak_tflops=1.0,
                       threads=args.threads, model={"vocab_size": model.config.vocab_size},
                       data=DataConfig(seq_len=args.prompt + args.response),
                       optim=OptimConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, schedule="constant"))
    trainer = Trainer(tcfg, task=task)
    step = trainer.train_step

    def timed():
        t0 = time.perf_counter()
        out = step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    trainer.train_step = timed
    trainer.fit()
    trainer.close()
    return _result("lmstack", method, times, 2 * args.batch * (args.prompt + args.response), args.device)


def run_trl(method: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = _pairs(args.batch, args.prompt, args.response, model.config.vocab_size)
    data = Dataset.from_list(rows * args.steps)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    peft_config = None
    ref_model = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(str(args.model), torch_dtype=torch.float32)
    cfg = DPOConfig(output_dir=str(Path(args.work) / f"trl_{method}"), per_device_train_batch_size=args.batch,
                    max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                    beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False, max_length=None,
                    logging_steps=args.steps, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                    dataloader_num_workers=0, remove_unused_columns=False, bf16=False, fp16=False,
                    gradient_checkpointing=False, seed=0)
    # the rows are already tokenized: skip trl's text preparation (prompt extraction, EOS, tokenization)
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=data, processing_class=tok,
                         peft_config=peft_config, callbacks=[Timer()])
    torch.set_num_threads(args.threads)
    trainer.train()
    tokens = 2 * args.batch * (args.prompt + args.response)
    return _result("trl", method, times, tokens, args.device)


def _result(impl: str, method: str, times: list[float], tokens: int, device: str) -> dict:
    steady = times[2:] if len(times) > 3 else times
    med = statistics.median(steady)
    return {"impl": impl, "method": method, "steps": len(times), "median_step_s": med,
            "tokens_per_step": tokens, "tokens_per_s": tokens / med, "peak_bytes": _peak(device)}


def _child(impl: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, method, "--steps", str(args.steps), "--batch", str(args.batch),
           "--prompt", str(args.prompt), "--response", str(args.response), "--device", args.device,
           "--threads", str(args.threads), "--work", str(args.work), "--model", str(args.model)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{impl} {method} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def dpo_rows(args: argparse.Namespace) -> list[dict]:
    """One row per (implementation, method). Each measurement is a fresh process; ``--rounds`` rounds alternate
    ours and trl, and each row keeps its fastest round's median step (the machine may be shared: the minimum
    is the least disturbed), with the spread over rounds."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for method in ("full", "lora"):
            for impl in ("lmstack", "trl"):
                runs.setdefault((impl, method), []).append(_child(impl, method, args))
    rows = []
    for key, rs in runs.items():
        best = min(rs, key=lambda r: r["median_step_s"])
        rows.append({**best, "rounds_step_s": [round(r["median_step_s"], 4) for r in rs]})
    return rows


def rm_hh(args: argparse.Namespace, steps: int = 300) -> dict:
    """The reward-model figure of docs/align.md: a from-scratch tiny decoder (2 layers, d64, learned positions,
    2,000-token BPE) on all HH-RLHF helpful test pairs, 20% held out by hash; accuracy with its bootstrap CI."""
    import gzip

    import torch

    from lmstack.align.config import RMConfig
    from lmstack.align.reward import train_reward_model
    from lmstack.config import from_dict
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    path = ROOT.parent / "shared" / "data" / "preference" / "hh_rlhf_helpful_base_test.jsonl.gz"
    rows = [json.loads(x) for x in gzip.open(path, "rt", encoding="utf-8").read().splitlines()]
    out = Path(args.work) / "rm_hh"
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe([r["chosen"] + r["rejected"] for r in rows[:1500]], 2000)
    torch.manual_seed(0)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=256,
                            pos="learned")), out / "base")
    tok.save(out / "base")
    (out / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(RMConfig, {"run_dir": str(out / "rm"), "base": str(out / "base"), "steps": steps,
                               "batch_size": 16, "lr": 3e-3, "bootstrap": 2000, "log_every": 25, "eval_every": 100,
                               "device": args.device, "dtype": "fp32", "warmup_steps": 20,
                               "data": {"train": [str(out / "hh.jsonl")], "max_len": 256, "valid_fraction": 0.2}})
    r = train_reward_model(cfg)
    return {"before": r["before"], "after": r["after"], "data": r["data"], "seconds": r["train_seconds"]}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"DPO step (sigmoid, live reference), stories260K, {args.batch} pairs x ({args.prompt} prompt + "
             f"{args.response} reply) tokens, {args.device}, {args.threads} threads, median of {args.steps - 2} steps, "
             f"fastest of {args.rounds} alternating rounds",
             "", "| method | impl | step ms | step ms per round | tokens/s | peak MB | tokens/s ours / trl "
             "| peak ours / trl |", "|---|---|---:|---|---:|---:|---:|---:|"]
    by = {(r["impl"], r["method"]): r for r in rows}
    for r in rows:
        other = by.get(("trl", r["method"]))
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}" if r["impl"] == "lmstack" and other else ""
        mem = f"{r['peak_bytes'] / other['peak_bytes']:.2f}" if r["impl"] == "lmstack" and other else ""
        rounds = ", ".join(f"{1000 * t:.0f}" for t in r.get("rounds_step_s", []))
        lines.append(f"| {r['method']} | {r['impl']} | {1000 * r['median_step_s']:.1f} | {rounds} | {r['tokens_per_s']:,.0f} "
                     f"| {r['peak_bytes'] / 2**20:.0f} | {ratio} | {mem} |")
    peak = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS of the process (includes imports)"
    return "\n".join(lines) + f"\n\npeak = {peak}.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each row keeps its fastest")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_align"))
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "METHOD"))
    ap.add_argument("--rm-hh", action="store_true", help="also train the HH-RLHF reward model (~10 minutes)")
    ap.add_argument("--no-grpo", action="store_true", help="skip the GRPO rows (bench/align_rl.py)")
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        impl, method = args.child
        out = (run_ours if impl == "lmstack" else run_trl)(method, args)
        print(json.dumps(out))
        return
    if not Path(args.model).is_dir():
        sys.exit(f"{args.model}: the stories260K checkpoint is not there (see ../shared/data/README.md)")
    rows = dpo_rows(args)
    print(render(rows, args))
    print(json.dumps(rows))
    if not args.no_grpo:  # the same run: GRPO's rollout/update time split and the batched engine's rollout rate
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from align_rl import grpo_rows

        for row in grpo_rows():
            print(json.dumps(row))
    if args.rm_hh:
        print(json.dumps(rm_hh(args)))


if __name__ == "__main__":
    main()
