"""``lmstack compress prune``: thin wrappers over lmstack.compress (heavy imports inside the handlers).

``register(sub)`` adds the ``compress`` group; each subcommand adds itself through its own
``_register_<name>(group_sub)``, so quantize/report join the same group with one more call.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    group = subparsers.add_parser(
        "compress", help="make a model smaller and faster (quantize, prune) and measure what it cost",
        description="Model transforms: weight quantization (int8, int4, NF4, GPTQ, AWQ), structured pruning "
                    "(a smaller dense model) and unstructured / 2:4 pruning (zeroed weights); `report` measures "
                    "size, perplexity, KL divergence, top-1 agreement and decode speed against a reference.",
        epilog="examples:\n"
               "  lmstack compress quantize runs/speedrun --method int8 --out runs/int8\n"
               "  lmstack compress quantize hf_llama --method gptq --group-size 64 --calib text.txt --out q4\n"
               "  lmstack compress report runs/speedrun runs/int8 q4 --text valid.txt\n"
               "  lmstack compress gguf runs/int8 --out runs/int8/model.gguf\n"
               "  lmstack compress prune runs/train/final --heads 0.25 --neurons 0.25 --out runs/pruned\n"
               "  lmstack compress prune hf_llama --unstructured 0.5 --method wanda --calib text.txt --out sparse",
        formatter_class=HelpFormatter)
    sub = group.add_subparsers(dest="compress_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    _register_prune(sub)
    _register_quantize(sub)
    _register_report(sub)
    _register_gguf(sub)
    _register_distill_data(sub)


def amount(text: str) -> float | int:
    """``0.25`` -> a fraction (float); ``3`` -> a count (int)."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.25 or a count like 3, got {text!r}") from None


def _register_prune(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    p = sub.add_parser(
        "prune", help="prune heads, FFN neurons, layers (smaller dense model) or single weights",
        description="Structured pruning (--heads, --neurons, --layers) writes a genuinely smaller dense model "
                    "with a matching config; unstructured pruning (--unstructured S, or --pattern 2:4) zeroes "
                    "weights in place. Both may be combined (structured first). RUN_OR_DIR is an lmstack model "
                    "folder (model_config.json) or a Hugging Face folder (config.json). Calibration text "
                    "(--calib) is needed by --score activation and --method wanda; it is tokenized with the "
                    "tokenizer.json next to the model.",
        epilog="examples:\n"
               "  lmstack compress prune runs/m --heads 0.25 --neurons 0.25 --out runs/m-pruned\n"
               "  lmstack compress prune runs/m --layers 2 --score activation --calib data/*.txt --out runs/m-l\n"
               "  lmstack compress prune runs/m --unstructured 0.5 --method wanda --calib val.txt --out runs/m-s\n"
               "  lmstack compress prune runs/m --pattern 2:4 --method magnitude --out runs/m-24\n"
               "  lmstack compress prune runs/m --heads 0.25 --neurons 0.25 --recover-steps 300 \\\n"
               "      --recover-text train.txt --recover-valid valid.txt --out runs/m-pr",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="RUN_OR_DIR")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--heads", type=amount, default=0.0,
                   help="attention heads to remove per layer: a fraction in [0, 1) or a count of query heads")
    p.add_argument("--neurons", type=amount, default=0.0,
                   help="FFN neurons to remove per layer: a fraction in [0, 1) or a count")
    p.add_argument("--layers", type=int, default=0, help="number of whole blocks to drop")
    p.add_argument("--score", default="magnitude", choices=("magnitude", "activation"),
                   help="importance of heads, neurons and layers (activation needs --calib)")
    p.add_argument("--gqa", default="group", choices=("group", "query"),
                   help="group: remove whole KV groups (smaller KV cache); query: the same number of query "
                        "heads from every group")
    p.add_argument("--unstructured", type=float, default=None, help="fraction of weights to zero, in [0, 1)")
    p.add_argument("--method", default="magnitude", choices=("magnitude", "wanda"),
                   help="unstructured score: |W| or Wanda's |W| * ||X|| (needs --calib)")
    p.add_argument("--pattern", default=None, help="semi-structured N:M mask, e.g. 2:4")
    p.add_argument("--scope", default="layer", choices=("layer", "global"), help="unstructured ranking scope")
    p.add_argument("--calib", nargs="+", default=None, metavar="FILES", help="calibration text files")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length (default 128)")
    p.add_argument("--format", default="same", choices=("same", "lmstack", "hf"),
                   help="output format (default: the input's)")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="recovery fine-tuning: N optimizer steps of causal-LM training on --recover-text after "
                        "structured pruning, through the one trainer (default 0: none)")
    p.add_argument("--recover-text", nargs="+", default=None, metavar="FILES", help="recovery training text")
    p.add_argument("--recover-valid", nargs="+", default=None, metavar="FILES",
                   help="held-out text for the before/after loss (a single .txt is one document: give this)")
    p.add_argument("--recover-lr", type=float, default=1e-3, help="recovery peak learning rate (default 1e-3)")
    p.add_argument("--recover-batch-size", type=int, default=8, help="recovery sequences per step (default 8)")
    p.add_argument("--recover-seq-len", type=int, default=256, help="recovery sequence length (default 256)")
    p.add_argument("--recover-run", default=None, metavar="DIR",
                   help="the recovery training run's directory (default: OUT-recovery beside OUT)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune)


def load_model_folder(source: str) -> tuple[Any, Path, str]:
    """(model, folder, "lmstack" | "hf") through the one loader's folder rules (a run directory finds its model)."""
    from lmstack.infer.text import find_model_folder, load_model_folder as load_folder

    folder = find_model_folder(Path(source))
    fmt = "lmstack" if (folder / "model_config.json").is_file() else "hf"
    return load_folder(folder), folder, fmt


def _tokenizer_dir(folder: Path) -> Path | None:
    return next((d for d in (folder, folder.parent) if (d / "tokenizer.json").is_file()), None)


def _copy_tokenizer(folder: Path, out: Path) -> None:
    from lmstack.model.cli import TOKENIZER_FILES

    tok_dir = _tokenizer_dir(folder) or folder
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)  # the umask's mode, not the source's


def cmd_prune(args: argparse.Namespace) -> int:
    from lmstack.compress.calib import text_batches
    from lmstack.compress.prune import prune_unstructured, sparsity_report
    from lmstack.compress.prune_structured import prune_structured
    structured = bool(args.heads or args.neurons or args.layers)
    if not structured and args.unstructured is None and args.pattern is None:
        raise ConfigError("prune: nothing to do; pass --heads, --neurons, --layers, --unstructured or --pattern")
    for field in ("calib_seqs", "seq_len", "recover_batch_size"):
        if getattr(args, field) < 1:
            raise ConfigError(f"prune: --{field.replace('_', '-')} must be a positive integer")
    if args.recover_steps < 0:
        raise ConfigError("prune: --recover-steps must be >= 0")
    if args.recover_steps and not args.recover_text:
        raise ConfigError("prune: --recover-steps needs training text; pass --recover-text FILES")
    if args.recover_steps and (args.unstructured is not None or args.pattern is not None):
        raise ConfigError("prune: --recover-steps trains every weight and would refill the zeroed ones; recover "
                          "after structured pruning only (--heads, --neurons, --layers)")
    if args.recover_steps and not structured:
        raise ConfigError("prune: --recover-steps needs structured pruning (--heads, --neurons or --layers)")
    model, folder, fmt = load_model_folder(args.source)
    model.eval()
    before = model.num_parameters()

    def calib():
        if not args.calib:
            return None
        from lmstack.tokenizer import load_tokenizer
        tdir = _tokenizer_dir(folder)
        if tdir is None:
            raise LmstackError(f"{folder}: no tokenizer.json next to the model to tokenize --calib with")
        return text_batches(load_tokenizer(tdir), args.calib, args.seq_len, args.calib_seqs)

    batches = calib() if args.calib else None
    report: dict[str, Any] = {"source": str(folder), "parameters_before": before}
    if structured:
        model, plan = prune_structured(model, args.heads, args.neurons, args.layers, args.score, batches, args.gqa)
        cfg = model.config
        report.update(kept_layers=plan.layers, n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                      head_dim=cfg.head_dim, d_ff=cfg.d_ff)
    if args.unstructured is not None or args.pattern is not None:
        prune_unstructured(model, args.unstructured if args.unstructured is not None else 0.5, args.method,
                           batches, args.scope, args.pattern)
        per_layer = sparsity_report(model)
        report["sparsity"] = per_layer.pop("total")
        report["sparsity_per_layer"] = per_layer
    report["parameters_after"] = model.num_parameters()
    out = Path(args.out)
    out_fmt = fmt if args.format == "same" else args.format
    import lmstack.model as lm
    if out_fmt == "hf":
        lm.hf.save(model, out)
    else:
        lm.save(model, out)
    _copy_tokenizer(folder, out)
    if args.recover_steps:
        from lmstack.train.recover import recover
        model, report["recovery"] = recover(out, args.recover_text, args.recover_valid, args.recover_steps,
                                            args.recover_run, lr=args.recover_lr, batch_size=args.recover_batch_size,
                                            seq_len=args.recover_seq_len)
        if out_fmt == "hf":      # the recovered weights replace the pruned ones, in the same format
            lm.hf.save(model, out)
        else:
            lm.save(model, out)
    from lmstack.runs import atomic_write_json
    atomic_write_json(out / "prune_report.json", report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        shape = (f"; layers {report['n_layer']}, heads {report['n_head']} (kv {report['n_kv_head']}), "
                 f"d_ff {report['d_ff']}" if structured else "")
        sparse = f"; sparsity {report['sparsity']:.1%}" if "sparsity" in report else ""
        print(f"pruned {folder} -> {out}: {before:,} -> {report['parameters_after']:,} parameters{shape}{sparse}")
        rec = report.get("recovery")
        if rec:
            loss = (f"; held-out loss {rec['val_loss_before']:.4f} -> {rec['val_loss_after']:.4f}"
                    if rec["val_loss_before"] is not None and rec["val_loss_after"] is not None else "")
            print(f"recovered: {rec['steps']} steps ({rec['tokens']:,} tokens){loss}; run {rec['run_dir']}")
    return 0



# ---------------------------------------------------------------------------------------------------------
# quantize


def _register_quantize(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    p = sub.add_parser(
        "quantize", help="store a model's linear weights in 8 or 4 bits (round-to-nearest, GPTQ or AWQ)",
        description="Replace every linear layer but the output head by a quantized one and write a model folder "
                    "that every lmstack command loads (generate, chat, eval, compress report). int8: per-row "
                    "scales; int4: groups of --group-size weights (--asymmetric adds a zero point); nf4: "
                    "NormalFloat levels; gptq / awq: calibrated int4 (or --bits 8) from --calib text.",
        epilog="examples:\n"
               "  lmstack compress quantize runs/speedrun --method int8 --out runs/int8\n"
               "  lmstack compress quantize stories260K --method int4 --group-size 32 --on-mismatch row --out q4\n"
               "  lmstack compress quantize runs/m --method gptq --calib data/valid.txt --out runs/m-gptq",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="RUN_OR_HF_DIR")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--method", required=True, choices=("int8", "w8a8", "int4", "nf4", "gptq", "awq"),
                   help="w8a8: int8 weights and int8 activations quantized on the fly (the fast CPU path)")
    p.add_argument("--group-size", type=int_at_least(2), default=128, help="weights per scale (4-bit formats)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="gptq/awq: the stored format")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a zero point per group")
    p.add_argument("--on-mismatch", default="error", choices=("error", "row", "int8"),
                   help="a layer whose width the group size does not divide: error, one group per row, or int8")
    p.add_argument("--calib", nargs="+", default=None, metavar="FILES", help="calibration text (gptq, awq)")
    p.add_argument("--calib-seqs", type=int_at_least(1), default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int_at_least(2), default=256, help="calibration sequence length")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lmstack.compress import QuantConfig, model_bytes, quantize_model, save_quantized

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: already exists; pass --force to replace it")
    calibrated = args.method in ("gptq", "awq")
    if calibrated and not args.calib:
        raise ConfigError(f"--method {args.method}: needs calibration text; pass --calib FILES")
    if args.calib and not calibrated:
        raise ConfigError(f"--calib: only gptq and awq use calibration data (not --method {args.method})")
    fmt = ("int8" if args.bits == 8 else "int4") if calibrated else "int8" if args.method == "w8a8" else args.method
    cfg = QuantConfig(fmt, args.group_size, not args.asymmetric, on_mismatch=args.on_mismatch,
                      activations="int8" if args.method == "w8a8" else "float")
    model, folder, _ = load_model_folder(args.source)
    model.eval()
    before = model_bytes(model)
    if calibrated:
        from lmstack.compress.calib import text_batches
        from lmstack.tokenizer import load_tokenizer

        tdir = _tokenizer_dir(folder)
        if tdir is None:
            raise LmstackError(f"{folder}: no tokenizer.json next to the model to tokenize --calib with")
        batches = text_batches(load_tokenizer(tdir), args.calib, args.seq_len, args.calib_seqs)
        if args.method == "gptq":
            from lmstack.compress.gptq import gptq_model
            layers = gptq_model(model, batches, cfg)
        else:
            from lmstack.compress.awq import awq_model
            layers = awq_model(model, batches, cfg)
    else:
        layers = quantize_model(model, cfg)
    info = {"method": args.method, "format": fmt, "group_size": args.group_size, "symmetric": not args.asymmetric,
            "source": str(folder.resolve())}
    save_quantized(model, out, info)
    _copy_tokenizer(folder, out)
    result = {**info, "out": str(out), "layers": len(layers), "bytes_before": before, "bytes_after": model_bytes(model)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"quantized {folder} -> {out}: {len(layers)} linear layers as {args.method} ({fmt}); "
              f"{before / 1e6:.2f} MB -> {result['bytes_after'] / 1e6:.2f} MB")
    return 0


# ---------------------------------------------------------------------------------------------------------
# report


def _register_report(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    p = sub.add_parser(
        "report", help="size, perplexity, KL divergence, top-1 agreement and decode speed vs a reference",
        description="Each model reads the same token chunks of --text as REF_DIR: perplexity, mean KL divergence "
                    "of the next-token distributions against the reference (llama.cpp's method), top-1 "
                    "agreement, the weights' size on disk, and greedy batch-1 decode tokens/s.",
        epilog="example:\n  lmstack compress report runs/speedrun runs/int8 runs/int4 --text data/valid.txt --json",
        formatter_class=HelpFormatter)
    p.add_argument("reference", metavar="REF_DIR")
    p.add_argument("models", nargs="+", metavar="DIR")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE", help="held-out text")
    p.add_argument("--seq-len", type=int_at_least(2), default=256)
    p.add_argument("--chunks", type=int_at_least(1), default=32, help="chunks of --seq-len tokens")
    p.add_argument("--new-tokens", type=int_at_least(1), default=64, help="tokens decoded for the speed figure")
    p.add_argument("--json", action="store_true", help="print {name: {size_bytes, ppl, kld_mean, ...}} as JSON")
    p.set_defaults(func=cmd_report)


def _size_on_disk(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def cmd_report(args: argparse.Namespace) -> int:
    from lmstack.eval.compression import compare, render, token_chunks
    from lmstack.infer.text import find_model_folder, load_run
    from lmstack.sources import iter_documents

    ref, tok = load_run(args.reference)
    text = "\n".join(iter_documents(args.text))   # .txt/.md whole, .jsonl/.json/.parquet by their text field
    chunks = token_chunks(tok.encode(text), args.seq_len, args.chunks)
    if int(chunks.max()) >= ref.config.vocab_size:
        raise ConfigError(f"{args.reference}: its tokenizer gives ids beyond the model's vocabulary")
    models, sizes = {}, {"reference": _size_on_disk(find_model_folder(Path(args.reference)))}
    for d in args.models:
        m, _ = load_run(d)
        if m.config.vocab_size != ref.config.vocab_size:
            raise ConfigError(f"{d}: vocabulary {m.config.vocab_size} differs from the reference's "
                              f"{ref.config.vocab_size}; compare models of one tokenizer")
        models[d] = m
        sizes[d] = _size_on_disk(find_model_folder(Path(d)))
    rows = compare(ref, models, chunks, sizes, args.new_tokens)
    rows[0].name = args.reference
    if args.json:
        print(json.dumps({r.name: {k: v for k, v in r.to_dict().items() if k != "name"} for r in rows}, indent=2))
    else:
        print(render(rows))
    return 0


# ---------------------------------------------------------------------------------------------------------
# gguf


def _register_gguf(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    p = sub.add_parser(
        "gguf", help="export a (quantized) Llama-architecture model as GGUF, which transformers and llama.cpp read",
        description="Write a GGUF file of a Llama-architecture model folder. Quantized layers keep their codes: "
                    "int8 -> Q8_0, int4 symmetric -> Q4_0, int4 asymmetric -> Q4_1 (group sizes that are "
                    "multiples of 32); the rest (float layers, NF4, AWQ) is written as F32. Scales become fp16. "
                    "transformers loads it with AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME). "
                    "Needs the gguf package (pip install \"lmstack[compress]\").",
        epilog="examples:\n"
               "  lmstack compress quantize stories260K --method int8 --out q8 && lmstack compress gguf q8 "
               "--out q8/model.gguf\n"
               "  lmstack compress gguf runs/int4-g32 --out int4.gguf --json",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="MODEL_DIR")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print {tensor: type} as JSON")
    p.set_defaults(func=cmd_gguf)


def cmd_gguf(args: argparse.Namespace) -> int:
    from lmstack.compress.gguf_export import export_gguf
    from lmstack.infer.text import load_run

    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: name a .gguf file")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: already exists; pass --force to replace it")
    model, _ = load_run(args.source)
    types = export_gguf(model, out, name=Path(args.source).resolve().name)
    if args.json:
        print(json.dumps(types, indent=2))
    else:
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {len(types)} tensors ({kinds})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# distill-data


def _register_distill_data(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    p = sub.add_parser(
        "distill-data", help="sequence-level KD data: a teacher's continuations of prompts, as JSONL training text",
        description="Generate the teacher's continuations of --prompts (greedy by default; --temperature > 0 "
                    "samples) through the inference engine and write one JSONL record per continuation, "
                    "{\"text\": prompt + completion, \"prompt\", \"completion\", \"finish_reason\"}, which "
                    "`lmstack train --data.train FILE` trains a student on (Kim & Rush 2016). Prompts: one per line "
                    "of a .txt file, or the --field of JSONL records.",
        epilog="examples:\n"
               "  lmstack compress distill-data runs/teacher --prompts prompts.txt --out kd.jsonl\n"
               "  lmstack compress distill-data stories260K --prompts p.txt --temperature 0.8 --samples 4 "
               "--max-new-tokens 200 --out kd.jsonl\n"
               "  lmstack train configs/train_tiny.toml --data.train kd.jsonl --data.tokenizer runs/teacher",
        formatter_class=HelpFormatter)
    p.add_argument("teacher", metavar="TEACHER_DIR")
    p.add_argument("--prompts", required=True, nargs="+", metavar="FILES")
    p.add_argument("--field", default="text", help="the prompt field of JSONL/Parquet records (default text)")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", type=int_at_least(1), default=1, help="continuations per prompt (sampling)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_distill_data)


def cmd_distill_data(args: argparse.Namespace) -> int:
    from lmstack.infer.config import GenerationConfig

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {out}: name a .jsonl file")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: already exists; pass --force to replace it")
    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        raise ConfigError("--samples: greedy decoding gives one continuation per prompt; set --temperature > 0")
    sample = args.temperature > 0
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=sample,
                           temperature=args.temperature if sample else 1.0, top_p=args.top_p,
                           num_return_sequences=args.samples, seed=args.seed if sample else None)
    from lmstack.train.distill_data import read_prompts, write_distill_data
    from lmstack.infer.text import load_run

    prompts = read_prompts(args.prompts, args.field)
    model, tok = load_run(args.teacher)
    n = write_distill_data(model, tok, prompts, out, cfg, args.batch_size)
    print(f"wrote {out}: {n} teacher continuations of {len(prompts)} prompts "
          f"({'sampled at T=' + str(args.temperature) if sample else 'greedy'}, <= {args.max_new_tokens} tokens)")
    return 0
