"""Decoder training throughput: our model vs Hugging Face's, same config, same weights, same batch.

For a GPT-2 and a Llama configuration a random HF model is built, saved and loaded into lmstack
(so the weights are identical), then forward+backward of the LM loss is timed on the same batch,
ours and HF's interleaved, several repeats, medians. Ratio ours/HF in tokens/s (goal >= 1.0).

    .venv/bin/python bench/model.py                          # fp32, batch 8 x 256
    .venv/bin/python bench/model.py --batch 4 --seq 512 --repeats 7 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def configs(seq: int):
    import transformers as t

    return {
        "gpt2 (6L, d256, 8h)": (t.GPT2Config(vocab_size=8192, n_embd=256, n_layer=6, n_head=8, n_positions=seq,
                                            bos_token_id=1, eos_token_id=2),
                                t.GPT2LMHeadModel),
        "llama (6L, d256, 8h/4kv)": (t.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                                                   max_position_embeddings=seq, tie_word_embeddings=True),
                                     t.LlamaForCausalLM),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32, or bf16 (autocast)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from lmstack.model import hf

    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    print(f"torch {torch.__version__}; {args.device} {args.dtype}; batch {args.batch} x {args.seq}; "
          f"fwd+bwd of the LM loss; median of {args.repeats}")
    print("| model | params | ours tok/s | HF tok/s | ratio ours/HF | max abs loss diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (cfg, cls) in configs(args.seq).items():
        torch.manual_seed(0)
        ref = cls(cfg).to(device).train()
        cfg._attn_implementation = "sdpa"
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            ours = hf.load(tmp).to(device).train()
        for m in (ref, ours):   # dropout off so both compute the same loss
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
        x, y = ids[:, :-1], ids[:, 1:]

        def ours_step() -> torch.Tensor:
            _, loss = ours(x, targets=y)
            return loss

        def hf_step() -> torch.Tensor:
            logits = ref(x).logits
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

        def timed(fn, model) -> tuple[float, float]:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = fn()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, loss.item()

        timed(ours_step, ours), timed(hf_step, ref)     # warm-up
        t_ours, t_hf, diffs = [], [], []
        for _ in range(args.repeats):
            a, la = timed(ours_step, ours)
            b, lb = timed(hf_step, ref)
            t_ours.append(a)
            t_hf.append(b)
            diffs.append(abs(la - lb))
        tokens = args.batch * args.seq
        tok_ours, tok_hf = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
        print(f"| {name} | {ours.num_parameters() / 1e6:.1f}M | {tok_ours:,.0f} | {tok_hf:,.0f} | "
              f"{tok_ours / tok_hf:.2f} | {max(diffs):.1e} |", flush=True)


if __name__ == "__main__":
    main()
