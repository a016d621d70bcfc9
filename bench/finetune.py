"""SFT with every method on the same base, data and budget; and a LoRA train step, ours vs peft.

1. Base: the tiny preset (4 layers, d128) pre-trained briefly with lmstack.train on the default corpus
   (stdlib docstrings), with a 2048-token BPE. SFT data: the default "explain what X does" rows.
2. Each method (full, lora, qlora, prefix, adapter) fine-tunes it for the same steps and batch size, in a
   fresh process (so peak RSS is that method's): held-out loss before/after, trainable/total params,
   frozen-base bytes, AdamW state bytes, peak memory, tokens/s.
3. Peer: one LoRA (r=8, q/k/v/o + MLP) forward+backward+AdamW step on the same Llama-style weights and
   batch, our model vs transformers + peft, interleaved, median of repeats; ratio ours/peft (tokens/s).

    .venv/bin/python bench/finetune.py                       # ~5 minutes on 2 CPU cores
    .venv/bin/python bench/finetune.py --steps 100 --repeats 5
    .venv/bin/python bench/finetune.py --data ../shared/data/sft/llamafactory_alpaca_en_demo.json --work runs/bench_ft_alpaca
                                    # any SFT file(s) instead of the default rows (5% held out)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHODS = ["full", "lora", "qlora", "prefix", "adapter"]
LR = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "prefix": 1e-2, "adapter": 2e-3}


def pretrain_base(work: Path, steps: int) -> Path:
    from lmstack.data.corpus import build_default_corpus
    from lmstack.tokenizer import train_bpe
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import pretrain

    base = work / "base"
    if (base / "model_config.json").is_file():
        return base
    build_default_corpus(work / "corpus")
    tok = train_bpe([work / "corpus" / "train.jsonl"], 2048)
    tok.save(work / "tok")
    cfg = TrainConfig(run_dir=str(base), steps=steps, batch_size=8, device="cpu", eval_every=0, ckpt_every=0,
                      sample_prompts=[], log_every=50,
                      model={"preset": "tiny", "vocab_size": tok.vocab_size, "max_seq_len": 128},
                      data=DataConfig(train=[str(work / "corpus" / "train.jsonl")], tokenizer=str(work / "tok"),
                                      seq_len=128),
                      optim=OptimConfig(lr=3e-3, warmup_steps=20))
    pretrain(cfg)
    return base


def run_one(method: str, base: str, work: str, steps: int, data: list[str] | None = None) -> dict:
    torch.set_num_threads(2)
    from lmstack.config import from_dict
    from lmstack.finetune.run import FinetuneConfig, finetune

    cfg = from_dict(FinetuneConfig, {
        "run_dir": f"{work}/sft_{method}", "base": base, "method": method, "steps": steps, "batch_size": 8,
        "lr": LR[method], "device": "cpu", "log_every": 10, "n_samples": 2, "sample_tokens": 32,
        "data": ({"train": list(data), "valid": [], "max_len": 128} if data else
                 {"train": [f"{work}/sft_data/train.jsonl"], "valid": [f"{work}/sft_data/valid.jsonl"],
                  "max_len": 128}),
        "lora": {"r": 8, "targets": ["attention", "mlp"]}, "quant": {"mode": "nf4", "group_size": 64},
        "prefix": {"n_prefix": 16, "hidden": 256}, "adapter": {"bottleneck": 32}})
    return finetune(cfg)


def peft_step_bench(repeats: int, batch: int, seq: int) -> tuple[float, float]:
    import peft
    import transformers

    from lmstack.finetune.lora import LoraConfig, add_lora
    from lmstack.model import hf

    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, max_position_embeddings=seq, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = hf.load(d)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    add_lora(ours, LoraConfig(r=8, alpha=16, targets=["attention", "mlp"]))
    x = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(1))
    # The same objective for both: next-token prediction over the same T tokens. transformers shifts `labels`
    # inside; ours takes the shifted targets, with the last position (no next token) ignored.
    y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)

    def stepper(model, hf_style):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step() -> float:
            loss = model(input_ids=x, labels=x).loss if hf_style else model(x, targets=y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    steps = {"ours": stepper(ours, False), "peft": stepper(theirs, True)}
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    first = {name: fn() for name, fn in steps.items()}  # warm-up; LoRA starts as the identity, so the same loss
    if abs(first["ours"] - first["peft"]) > 1e-4:
        raise SystemExit(f"objectives differ: first-step loss ours {first['ours']:.6f} vs peft {first['peft']:.6f}")
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tok = batch * seq
    return tok / statistics.median(times["ours"]), tok / statistics.median(times["peft"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="SFT steps per method")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="runs/bench_finetune")
    ap.add_argument("--data", nargs="*", default=[], help="SFT files (Alpaca JSON/JSONL, messages) instead of "
                    "the default rows, e.g. ../shared/data/sft/llamafactory_alpaca_en_demo.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    if args.one:
        res = run_one(args.one, str(work / "base"), str(work), args.steps, args.data)
        print("RESULT " + json.dumps(res))
        return
    work.mkdir(parents=True, exist_ok=True)
    pretrain_base(work, args.pretrain_steps)
    from lmstack.finetune.sft import build_default_sft

    if not (work / "sft_data" / "train.jsonl").is_file():
        build_default_sft(work / "sft_data", max_rows=3000, valid_fraction=0.05)
    rows = []
    for m in METHODS:
        out = subprocess.run([sys.executable, __file__, "--one", m, "--work", str(work), "--steps", str(args.steps),
                              *(["--data", *args.data] if args.data else [])],
                             capture_output=True, text=True, check=True)
        res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        rows.append(res)
        print(f"[bench] {m}: {res['heldout_loss_base']:.3f} -> {res['heldout_loss_after']:.3f}", file=sys.stderr)
    mb = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    print(f"\nSFT on {rows[0]['data']['train_examples']:,} examples ({rows[0]['data']['heldout_examples']} held out), "
          f"{args.steps} steps x batch 8, max_len 128, base = tiny preset pre-trained {args.pretrain_steps} steps\n")
    print("| method | lr | held-out loss base -> after | trainable / total params | frozen base MB "
          "| AdamW state MB | peak RSS MB | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['heldout_loss_base']:.3f} -> {r['heldout_loss_after']:.3f} "
              f"| {r['params_trainable']:,} / {r['params_total']:,} ({100 * r['trainable_fraction']:.1f}%) "
              f"| {mb(r['frozen_base_bytes'])} | {mb(r['optimizer_state_bytes'])} | {mb(r['peak_memory_bytes'])} "
              f"| {r['tokens_per_s']:,.0f} |")
    lora = next(r for r in rows if r["method"] == "lora")
    print("\nSamples (LoRA), before -> after:\n")
    for s in lora["samples"]:
        print(f"- {s['prompt']}\n  - before: {s['before'][:160]!r}\n  - after: {s['after'][:160]!r}")
    ours, theirs = peft_step_bench(args.repeats, 8, 128)
    print("\nLoRA train step (Llama-style 4L d128, r=8 on q/k/v/o/gate/up/down, batch 8 x 128, fp32, "
          f"median of {args.repeats}):\n")
    print("| | ours | transformers + peft | ratio ours/peft |\n|---|---:|---:|---:|")
    print(f"| tokens/s | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
