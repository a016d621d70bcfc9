"""Structured-output benchmark: JSON Schema constrained decoding with llguidance and xgrammar, side by side, on
JSONSchemaBench (``../shared/data/json_schemas/{Github_trivial,Glaiveai2K,Github_easy}.jsonl``).

    .venv/bin/python bench/structured.py --limit 30          # a quick look (30 schemas per set)
    .venv/bin/python bench/structured.py                     # every schema (1,500), both engines, 3 vocabularies

For every schema and engine: compile (``lmstack.infer.constrain.compile_constraint``: meta-schema check,
engine compile, first mask), then generate with a tiny *random* decoder (2 layers, d_model 64; sampling,
seed = schema index, ``--max-new-tokens``) through ``lmstack.infer.text.complete`` with
``GenerationConfig(json_schema=...)``, and check the output with ``jsonschema`` (draft from ``$schema``,
2020-12 by default). A row reports:

- compiled: schemas the engine compiled / all (the rest fail closed: an unsupported keyword, an unsatisfiable
  or invalid schema, each a one-line error);
- finished: outputs that ended with the stop id (the rest ran out of ``max_new_tokens``: finish reason
  "length", reported as incomplete, never as valid);
- valid: finished outputs that parse and validate (goal 100%); invalid accepted: finished outputs that do not
  (goal 0);
- mask p50/p99: the engine's time to compute one row's token mask, every decoding step of every schema;
- compile p50/p99;
- overhead: median per-token decode time constrained / unconstrained (same model, prompt, sampling) - 1.

Vocabularies: stories260K's SentencePiece (512), lmstack's byte-level BPE trained on TinyStories (8,192),
GPT-2 (50,257; above the issue's 4-32k range, as the real-world upper case). The speedrun's model is used
when ``runs/speedrun*`` exists (pass ``--run``); otherwise that row is skipped with a message. One thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.infer import GenerationConfig
from lmstack.infer.constrain import ConstraintError, compile_constraint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SETS = ("Github_trivial", "Glaiveai2K", "Github_easy")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load_schemas(limit: int | None) -> list[tuple[str, dict]]:
    out = []
    for name in SETS:
        lines = (SHARED / "json_schemas" / f"{name}.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines if x.strip()]
        if limit:
            rows = rows[:limit]
        out += [(name, r["schema"]) for r in rows]
    return out


def tokenizers(which: list[str]):
    from lmstack.tokenizer import load_tokenizer, train_bpe

    for name in which:
        if name == "stories512":
            yield name, load_tokenizer(SHARED / "models" / "stories260K")
        elif name == "bpe8k":
            text = SHARED / "text" / "tinystories" / "tinystories_train_first2MiB.txt"
            yield name, train_bpe([text], vocab_size=8192)
        elif name == "gpt2":
            yield name, load_tokenizer(SHARED / "tokenizers" / "gpt2")


def random_model(vocab: int):
    from lmstack.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=vocab, d_model=64, n_layer=2, n_head=4, max_seq_len=512,
                              tie_embeddings=False)).eval()


def validate(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        # formats checked where jsonschema can (email, ipv4/6, date, uuid, ...), not only annotated
        return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(value)
    except Exception:   # a schema jsonschema itself cannot evaluate (e.g. a remote $ref)
        return False


def run_engine(model, tok, schemas, engine: str, max_new: int, prompt: str) -> dict:
    row = {"engine": engine, "schemas": len(schemas), "compiled": 0, "outputs": 0, "finished": 0, "valid": 0,
           "invalid": 0, "mask_s": [], "compile_s": [], "tok_s": [], "errors": {}, "invalid_examples": []}
    vocab = model.config.vocab_size
    eos = [tok.eos_id]
    compile_constraint("json_schema", {"type": "object"}, tok, backend=engine, vocab_size=vocab, eos=eos)   # warm
    for i, (_, schema) in enumerate(schemas):
        t0 = time.perf_counter()
        try:
            compile_constraint("json_schema", schema, tok, backend=engine, vocab_size=vocab, eos=eos)
        except ConstraintError as e:
            key = str(e)[:150]
            row["errors"][key] = row["errors"].get(key, 0) + 1
            continue
        row["compile_s"].append(time.perf_counter() - t0)
        row["compiled"] += 1
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, seed=i, json_schema=schema,
                               constraint_backend=engine)
        from lmstack.infer.engine import generate_result
        from lmstack.infer.text import prepare_prompts

        ids, _, full = prepare_prompts(model, tok, [prompt], cfg)
        try:
            res = generate_result(model, ids, full, tokenizer=tok)
        except ConstraintError as e:      # the engine gave up mid-output (a resource limit): no output at all
            row["runtime_errors"] = row.get("runtime_errors", 0) + 1
            key = "mid-generation: " + str(e)[:120]
            row["errors"][key] = row["errors"].get(key, 0) + 1
            continue
        row["outputs"] += 1
        row["mask_s"] += res.stats.get("constraint_mask_s", [])
        n = res.num_generated[0]
        if n:
            row["tok_s"].append(res.stats["decode_s"] / n if n > 1 else res.stats["total_s"])
        if res.finish_reasons[0] == "stop":
            row["finished"] += 1
            new = [t for t in res.new_tokens(0) if t not in eos]
            text = b"".join(tok.token_bytes(t) for t in new).decode("utf-8", errors="replace")
            if validate(text, schema):
                row["valid"] += 1
            else:
                row["invalid"] += 1
                row["invalid_examples"].append({"index": i, "schema": schema, "text": text})
    return row


def baseline_token_s(model, tok, max_new: int, prompt: str, runs: int = 20) -> float:
    """Median per-token decode time, unconstrained sampling, no stop id (every run is max_new tokens)."""
    from lmstack.infer.engine import generate_result

    ids = tok.encode(prompt) or [tok.eos_id]
    times = []
    for i in range(runs):
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, seed=i)
        res = generate_result(model, [ids], cfg)
        times.append(res.stats["decode_s"] / max(res.num_generated[0] - 1, 1))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="schemas per set (default: all)")
    ap.add_argument("--vocab", action="append", choices=["stories512", "bpe8k", "gpt2"], default=None)
    ap.add_argument("--engine", action="append", choices=["llguidance", "xgrammar"], default=None)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--run", default=None, help="a speedrun folder (default: runs/speedrun* under the repo)")
    ap.add_argument("--out", default=None, help="write the raw rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engines = args.engine or ["llguidance", "xgrammar"]
    schemas = load_schemas(args.limit)
    prompt = "JSON:"
    print(f"# {len(schemas)} schemas ({', '.join(SETS)}), max_new_tokens {args.max_new_tokens}, engines "
          f"{', '.join(engines)}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, 1 thread", flush=True)
    rows = []
    for vname, tok in tokenizers(args.vocab or ["stories512", "bpe8k", "gpt2"]):
        model = random_model(tok.vocab_size)
        base = baseline_token_s(model, tok, args.max_new_tokens, prompt)
        for engine in engines:
            t0 = time.perf_counter()
            row = run_engine(model, tok, schemas, engine, args.max_new_tokens, prompt)
            row.update(vocab=vname, vocab_size=tok.vocab_size, model="random", base_tok_s=base,
                       wall_s=time.perf_counter() - t0)
            rows.append(row)
            print(summary(row), flush=True)
    runs = [Path(args.run)] if args.run else sorted(ROOT.glob("runs/speedrun*"))
    runs = [r for r in runs if r.is_dir()]
    if not runs:
        print(f"# the speedrun's model: skipped (no runs/speedrun* folder under {ROOT}; pass --run)")
    else:
        from lmstack.infer.text import load_run

        model, tok = load_run(runs[0], prefer=("chat_model", "pretrain"))
        base = baseline_token_s(model, tok, args.max_new_tokens, prompt)
        for engine in engines:
            row = run_engine(model, tok, schemas, engine, args.max_new_tokens, prompt)
            row.update(vocab=f"{runs[0].name}", vocab_size=tok.vocab_size, model="speedrun", base_tok_s=base)
            rows.append(row)
            print(summary(row), flush=True)
    print()
    print(table(rows))
    for r in rows:
        if r["errors"]:
            print(f"\n{r['engine']} / {r['vocab']}: not compiled, by error:")
            for k, v in sorted(r["errors"].items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {v:4d}  {k}")
        for ex in r["invalid_examples"][:5]:
            print(f"\nINVALID ACCEPTED ({r['engine']}/{r['vocab']}): {ex['text'][:200]!r}\n  schema {json.dumps(ex['schema'])[:300]}")
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k not in ("mask_s", "tok_s")}
                                              for r in rows], indent=1, default=str))


def summary(r: dict) -> str:
    return (f"{r['engine']:10s} {r['vocab']:10s} compiled {r['compiled']}/{r['schemas']} finished {r['finished']} "
            f"valid {r['valid']} invalid {r['invalid']} mask p50 {pct(r['mask_s'], .5) * 1e6:.1f} us "
            f"p99 {pct(r['mask_s'], .99) * 1e6:.1f} us ({r.get('wall_s', 0):.0f} s)")


def table(rows: list[dict]) -> str:
    head = ("| model / vocab | engine | compiled | finished | valid / finished | invalid accepted | mask p50 | "
            "mask p99 | compile p50 | compile p99 | decode overhead |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        tok_s = statistics.median(r["tok_s"]) if r["tok_s"] else float("nan")
        fin = r["finished"]
        lines.append(
            f"| {r['model']} / {r['vocab']} ({r['vocab_size']:,}) | {r['engine']} | "
            f"{r['compiled']}/{r['schemas']} ({100 * r['compiled'] / r['schemas']:.1f}%) | "
            f"{fin}/{r['outputs']}{' (+%d engine errors)' % r['runtime_errors'] if r.get('runtime_errors') else ''} | {r['valid']}/{fin} ({100 * r['valid'] / max(fin, 1):.1f}%) | {r['invalid']} | "
            f"{pct(r['mask_s'], .5) * 1e6:.0f} us | {pct(r['mask_s'], .99) * 1e6:.0f} us | "
            f"{pct(r['compile_s'], .5) * 1e3:.1f} ms | {pct(r['compile_s'], .99) * 1e3:.1f} ms | "
            f"{100 * (tok_s / r['base_tok_s'] - 1):+.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
