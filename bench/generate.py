"""Generation benchmark: lmstack.infer vs Hugging Face ``generate`` on the same weights, KV cache vs none,
memory per sequence, and speculative decoding with a 4-8x smaller draft.

    .venv/bin/python bench/generate.py            # ~3-5 minutes on 2 CPU cores (first run trains the
                                                  # speculative pair, ~1-2 min, cached in --cache-dir)

Models (fp32, CPU, 2 threads):
- throughput: a GPT-2-shaped model (6 layers, d=384, vocab 8192, ~14M parameters), random weights, saved by
  transformers and loaded into lmstack (``lmstack.model.hf.load``): the very same weights on both sides;
  greedy, 32-token prompt, 64 new tokens (no EOS, so every run does all 64 steps);
- speculative: a GPT-2-shaped target (8 layers, d=384, vocab 2048) trained for a minute on Python's own
  documentation (``pydoc_data.topics``), and a draft that is its truncated copy (embeddings, first
  layer, final norm, head; ~5.6x fewer parameters) distilled on the target's outputs for a few seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.infer import GenerationConfig, generate_result  # noqa: E402
from lmstack.model import KVCache, build_model, hf, load, save  # noqa: E402
from lmstack.model.config import ModelConfig  # noqa: E402


def median_times(fns: list, repeats: int) -> list[float]:
    """Median wall-clock of each function, run interleaved (one round of all per repeat), so that load
    from other jobs on this shared machine hits all of them alike."""
    for fn in fns:
        fn()                                               # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------------------------------- throughput


def throughput(repeats: int, new: int) -> list[str]:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=8192, n_embd=384, n_layer=6, n_head=6, n_positions=512,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = hf.load(d)
    n_params = sum(p.numel() for p in ours.parameters())
    rows = [f"Model: GPT-2 shape, 6 layers, d=384, vocab 8192, {n_params / 1e6:.1f}M parameters, fp32; prompt 32 "
            f"tokens, {new} new tokens, greedy; median of {repeats}, interleaved.", "",
            "| batch | ours KV cache tok/s | ours no cache tok/s | HF generate tok/s | ours/HF | cache speedup |",
            "| --- | --- | --- | --- | --- | --- |"]
    for batch in (1, 8):
        ids = torch.randint(1, 8192, (batch, 32), generator=torch.Generator().manual_seed(batch))
        gcfg = GenerationConfig(max_new_tokens=new)
        same = torch.equal(generate_result(ours, ids, gcfg).sequences,
                           ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                        min_new_tokens=new, do_sample=False, pad_token_id=0))
        def hf_generate():
            with torch.inference_mode():
                ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)

        t_ours, t_none, t_hf = median_times([lambda: generate_result(ours, ids, gcfg),
                                             lambda: generate_result(ours, ids, gcfg.replace(use_cache=False)),
                                             hf_generate], repeats)
        tok = batch * new
        rows.append(f"| {batch} | {tok / t_ours:.0f} | {tok / t_none:.0f} | {tok / t_hf:.0f} | {t_hf / t_ours:.2f}x | "
                    f"{t_none / t_ours:.2f}x |" + ("" if same else " (ids differ!)"))
        print(rows[-1], flush=True)

    # memory per sequence: what the KV cache holds for one sequence, from the config and measured
    c = ours.config
    cache = KVCache.for_model(ours, batch_size=8, max_len=32 + new)
    rows += ["", "| memory per sequence | fp32 | bf16 |", "| --- | --- | --- |",
             f"| KV cache per token (2 * layers * kv_heads * head_dim * bytes) | {c.kv_cache_bytes_per_token(torch.float32):,} B "
             f"| {c.kv_cache_bytes_per_token(torch.bfloat16):,} B |",
             f"| KV cache, {32 + new}-token sequence (measured: allocated buffers / batch) | "
             f"{cache.bytes / 8 / 2**20:.2f} MiB | {cache.bytes / 16 / 2**20:.2f} MiB |",
             f"| KV cache, full context ({c.max_seq_len} tokens) | "
             f"{c.kv_cache_bytes_per_token(torch.float32) * c.max_seq_len / 2**20:.1f} MiB | "
             f"{c.kv_cache_bytes_per_token(torch.bfloat16) * c.max_seq_len / 2**20:.1f} MiB |",
             f"| weights (shared by all sequences) | {n_params * 4 / 2**20:.1f} MiB | {n_params * 2 / 2**20:.1f} MiB |"]
    return rows


# ---------------------------------------------------------------------------------------------------- speculative pair


def corpus_ids(tok) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(tok.encode(text), dtype=torch.long)


def batches(data: torch.Tensor, n: int, batch: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + length + 1] for s in starts.tolist()])


def train_pair(cache_dir: Path, steps: int, distil_steps: int):
    """The target trained briefly on text; the draft its truncated copy, distilled. Cached on disk."""
    from lmstack.tokenizer import load_tokenizer, train_bpe

    if (cache_dir / "draft" / "model_config.json").is_file():
        tok = load_tokenizer(cache_dir)
        return load(cache_dir / "target"), load(cache_dir / "draft"), tok, corpus_ids(tok)
    from pydoc_data.topics import topics

    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = train_bpe([topics[k] for k in sorted(topics)], vocab_size=2048)
    tok.save(cache_dir)
    data = corpus_ids(tok)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=384, n_layer=8, n_head=6, max_seq_len=512, pos="learned",
                      norm="layernorm", ffn="mlp", activation="gelu_tanh", bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    target = build_model(cfg)
    opt = torch.optim.AdamW(target.parameters(), lr=2e-3, weight_decay=0.0)
    for step, xy in enumerate(batches(data, steps, 8, 128, 0)):
        lr = 2e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        _, loss = target(xy[:, :-1], targets=xy[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"  target step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    target.eval()
    # the draft: embeddings, the first block, the final norm and the head of the target
    draft = build_model(cfg.replace(n_layer=1))
    sd = {k: v for k, v in target.state_dict().items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    draft.load_state_dict(sd)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3, weight_decay=0.0)
    for step, xy in enumerate(batches(data, distil_steps, 8, 128, 1)):
        with torch.no_grad():
            teacher = target(xy[:, :-1]).log_softmax(-1)
        student = draft(xy[:, :-1]).log_softmax(-1)
        loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == distil_steps - 1:
            print(f"  draft distil step {step} KL {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    draft.eval()
    save(target, cache_dir / "target")
    save(draft, cache_dir / "draft")
    return target, draft, tok, data


def speculative(cache_dir: Path, repeats: int, new: int, steps: int, distil_steps: int) -> list[str]:
    target, draft, tok, data = train_pair(cache_dir, steps, distil_steps)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    gen = torch.Generator().manual_seed(5)
    starts = torch.randint(0, data.numel() - 64, (4,), generator=gen).tolist()
    prompts = [data[s:s + 48].tolist() for s in starts]
    rows = [f"Target: 8 layers, d=384, vocab {tok.vocab_size}, {n_t / 1e6:.1f}M parameters; draft: its first "
            f"layer (+ embeddings, head), {n_d / 1e6:.1f}M ({n_t / n_d:.1f}x smaller). Batch 1, 48-token prompts "
            f"from the training text, {new} new tokens, 4 prompts per timing, median of {repeats}.", "",
            "| decoding | proposer | k | acceptance | tokens / target forward | time (s) | speedup | same ids |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def run(cfg, draft_model=None):
        return [generate_result(target, [p], cfg, draft_model=draft_model) for p in prompts]

    for mode, base in (("greedy", GenerationConfig(max_new_tokens=new)),
                       ("sampling T=1", GenerationConfig(max_new_tokens=new, do_sample=True, seed=0))):
        plain = run(base)
        cases = [("draft model", base.replace(num_assistant_tokens=k), draft, k) for k in (3, 5)]
        if mode == "greedy":
            cases.append(("prompt lookup", base.replace(prompt_lookup_num_tokens=4), None, 4))
        times = median_times([lambda: run(base)] + [lambda c=c: run(c[1], c[2]) for c in cases], repeats)
        t_plain = times[0]
        rows.append(f"| {mode} | none (target alone) | - | - | 1.00 | {t_plain:.2f} | 1.00x | - |")
        for (name, cfg, dm, k), t in zip(cases, times[1:]):
            res = run(cfg, dm)
            prop = sum(r.stats.get("proposed", 0) for r in res)
            acc = sum(r.stats.get("accepted", 0) for r in res) / max(prop, 1)
            per = sum(r.stats["new_tokens"] for r in res) / sum(r.stats["target_forwards"] for r in res)
            same = all(torch.equal(a.sequences, b.sequences) for a, b in zip(res, plain)) if mode == "greedy" else "n/a"
            rows.append(f"| {mode} | {name} | {k} | {acc:.0%} | {per:.2f} | {t:.2f} | {t_plain / t:.2f}x | {same} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=120)
    p.add_argument("--distil-steps", type=int, default=60)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lmstack-bench-generate")
    p.add_argument("--skip", choices=["throughput", "speculative"], action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(2)
    import platform

    print(f"# lmstack.infer generation benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n", flush=True)
    out = []
    if "throughput" not in args.skip:
        out += ["## throughput and memory", ""] + throughput(args.repeats, args.new_tokens) + [""]
    if "speculative" not in args.skip:
        out += ["## speculative decoding", ""] + speculative(args.cache_dir, args.repeats, args.new_tokens,
                                                             args.train_steps, args.distil_steps)
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
