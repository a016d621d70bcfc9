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
        "compress", help="make a model smaller and faster (pruning)",
        description="Model transforms: structured pruning (a smaller dense model) and unstructured / 2:4 "
                    "pruning (zeroed weights).",
        epilog="examples:\n"
               "  lmstack compress prune runs/train/final --heads 0.25 --neurons 0.25 --out runs/pruned\n"
               "  lmstack compress prune hf_llama --unstructured 0.5 --method wanda --calib text.txt --out sparse",
        formatter_class=HelpFormatter)
    sub = group.add_subparsers(dest="compress_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    _register_prune(sub)


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
               "  lmstack compress prune runs/m --pattern 2:4 --method magnitude --out runs/m-24",
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_prune)


def load_model_folder(source: str) -> tuple[Any, Path, str]:
    """(model, folder, "lmstack" | "hf") of an lmstack or Hugging Face model folder."""
    import lmstack.model as lm

    folder = Path(source)
    for cand in (folder, folder / "model", folder / "final"):
        if (cand / "model_config.json").is_file():
            return lm.load(cand), cand, "lmstack"
        if (cand / "config.json").is_file():
            return lm.hf.load(cand), cand, "hf"
    raise LmstackError(f"{folder}: no model found (expected model_config.json or a Hugging Face config.json)")


def cmd_prune(args: argparse.Namespace) -> int:
    from lmstack.compress.calib import text_batches
    from lmstack.compress.prune import prune_unstructured, sparsity_report
    from lmstack.compress.prune_structured import prune_structured
    from lmstack.model.cli import TOKENIZER_FILES

    structured = bool(args.heads or args.neurons or args.layers)
    if not structured and args.unstructured is None and args.pattern is None:
        raise ConfigError("prune: nothing to do; pass --heads, --neurons, --layers, --unstructured or --pattern")
    for field in ("calib_seqs", "seq_len"):
        if getattr(args, field) < 1:
            raise ConfigError(f"prune: --{field.replace('_', '-')} must be a positive integer")
    model, folder, fmt = load_model_folder(args.source)
    model.eval()
    before = model.num_parameters()

    def calib():
        if not args.calib:
            return None
        from lmstack.tokenizer import load_tokenizer
        tdir = next((d for d in (folder, folder.parent) if (d / "tokenizer.json").is_file()), None)  # as load_run
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
    tok_dir = next((d for d in (folder, folder.parent) if (d / "tokenizer.json").is_file()), folder)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    from lmstack.runs import atomic_write_json
    atomic_write_json(out / "prune_report.json", report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        shape = (f"; layers {report['n_layer']}, heads {report['n_head']} (kv {report['n_kv_head']}), "
                 f"d_ff {report['d_ff']}" if structured else "")
        sparse = f"; sparsity {report['sparsity']:.1%}" if "sparsity" in report else ""
        print(f"pruned {folder} -> {out}: {before:,} -> {report['parameters_after']:,} parameters{shape}{sparse}")
    return 0

