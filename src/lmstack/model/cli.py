"""``lmstack model info | convert``: thin wrappers over lmstack.model and lmstack.model.hf."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least

    group = subparsers.add_parser(
        "model", help="inspect model configs and convert checkpoints (lmstack <-> Hugging Face)",
        description="Transformer models: sizes from a preset or checkpoint; Hugging Face checkpoint conversion.",
        epilog="examples:\n"
               "  lmstack model info tiny\n"
               "  lmstack model info gpt2-124m --seq-len 2048\n"
               "  lmstack model info llama-style-125m --n_layer 24 --d_model 1024\n"
               "  lmstack model convert path/to/hf_llama runs/llama   # HF -> lmstack\n"
               "  lmstack model convert runs/train/final hf_out         # lmstack -> HF",
        formatter_class=HelpFormatter)
    sub = group.add_subparsers(dest="model_command", metavar="COMMAND")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    info = sub.add_parser(
        "info", help="architecture, parameters, FLOPs/token and memory of a preset or checkpoint",
        description="Print the architecture, parameter count, training FLOPs per token (6N + attention), "
                    "weight memory at bf16/fp32 and KV-cache bytes per token. PATH_OR_PRESET is a preset "
                    "(tiny, small, gpt2-124m, llama-style-125m), an lmstack model folder, a Hugging Face "
                    "folder, or a .json/.toml/.yaml file of ModelConfig fields. Extra --field VALUE "
                    "arguments override config fields. Only the config is read; no weights are loaded.",
        epilog="examples:\n"
               "  lmstack model info tiny\n"
               "  lmstack model info small --n_experts 8 --moe_top_k 2\n"
               "  lmstack model info path/to/hf_folder --json",
        formatter_class=HelpFormatter)
    info.add_argument("source", metavar="PATH_OR_PRESET")
    info.add_argument("--seq-len", type=int_at_least(1), default=None,
                      help="sequence length for FLOPs (default: max_seq_len)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info, accepts_overrides=True)

    conv = sub.add_parser(
        "convert", help="convert a checkpoint between Hugging Face and lmstack formats",
        description="SRC with config.json (Hugging Face: gpt2, llama, mistral, qwen2, bert, bart) is written "
                    "as an lmstack folder (model.safetensors + model_config.json); SRC with model_config.json "
                    "(lmstack) is written as a Hugging Face folder that transformers loads. Tokenizer files "
                    "found in SRC are copied. OUT is replaced atomically; an OUT that holds anything but a converted "
                    "model's files (a run directory, your own files) is refused unless --force, and a file at "
                    "OUT always is.",
        epilog="examples:\n"
               "  lmstack model convert hf_gpt2/ runs/gpt2\n"
               "  lmstack model convert runs/speedrun/model hf_export --dtype bf16",
        formatter_class=HelpFormatter)
    conv.add_argument("src", metavar="SRC")
    conv.add_argument("out", metavar="OUT")
    conv.add_argument("--dtype", default=None, help="cast weights (fp32, bf16, fp16); default: keep")
    conv.add_argument("--force", action="store_true",
                      help="replace an existing OUT folder that holds more than a model's files")
    conv.set_defaults(func=cmd_convert)


def resolve_config(source: str, overrides: list[str] | None = None):
    """A ModelConfig from a preset name, an lmstack folder, a HF folder or a config file, plus CLI overrides."""
    from lmstack.config import from_dict, parse_overrides, read_config_file, to_dict
    from lmstack.model import PRESETS, ModelConfig, hf
    from lmstack.model.config import preset

    path = Path(source)
    if source in PRESETS:
        base = to_dict(preset(source))
    elif (path / "model_config.json").is_file():
        base = json.loads((path / "model_config.json").read_text())
    elif path.is_dir():
        base = to_dict(hf.config_from_hf(json.loads((hf._model_folder(path) / "config.json").read_text())))
    elif path.is_file():
        base = read_config_file(path)
    else:
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder or config file")
    extra = parse_overrides(overrides or [])
    # derived fields must be recomputed when their inputs change
    for field, inputs in (("head_dim", ("d_model", "n_head")), ("d_ff", ("d_model", "ffn")),
                          ("n_kv_head", ("n_head",))):
        if any(k in extra for k in inputs) and field not in extra:
            base.pop(field, None)
    return from_dict(ModelConfig, {**base, **extra})


def describe(cfg, seq_len: int | None = None) -> dict[str, Any]:
    """The numbers ``lmstack model info`` prints."""
    import torch

    from lmstack.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    n = model.num_parameters()
    seq_len = seq_len or cfg.max_seq_len
    kv_bf16 = cfg.kv_cache_bytes_per_token(torch.bfloat16)
    return {
        "arch": cfg.arch, "layers": cfg.n_layer, "encoder_layers": cfg.n_encoder_layer if cfg.arch == "encoder-decoder"
        else None, "d_model": cfg.d_model, "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "ffn": f"{cfg.ffn} ({cfg.activation}) x{cfg.d_ff}", "norm": f"{cfg.norm} ({cfg.norm_position})",
        "positions": cfg.pos, "vocab": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
        "experts": f"{cfg.n_experts} (top-{cfg.moe_top_k})" if cfg.n_experts else None,
        "sliding_window": None if cfg.sliding_window is None else
        f"{cfg.sliding_window}" + (f" (layers >= {cfg.max_window_layers})" if cfg.max_window_layers else ""),
        "parameters": n, "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "active_matmul_parameters": cfg.active_matmul_params(), "seq_len": seq_len,
        "train_flops_per_token": cfg.flops_per_token(seq_len),
        "weights_bf16_bytes": 2 * n, "weights_fp32_bytes": 4 * n,
        "kv_cache_bytes_per_token_bf16": kv_bf16, "kv_cache_bytes_at_max_len_bf16": kv_bf16 * cfg.max_seq_len,
    }


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


def cmd_info(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.source, getattr(args, "overrides", None))
    facts = describe(cfg, args.seq_len)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    pretty = dict(facts)
    pretty["parameters"] = f"{facts['parameters']:,} ({_human(facts['parameters'])})"
    pretty["non_embedding_parameters"] = f"{facts['non_embedding_parameters']:,}"
    pretty["active_matmul_parameters"] = f"{facts['active_matmul_parameters']:,}"
    pretty["train_flops_per_token"] = f"{_human(facts['train_flops_per_token'], 'FLOP')} (6N + attention at T={facts['seq_len']})"
    for key in ("weights_bf16_bytes", "weights_fp32_bytes", "kv_cache_bytes_per_token_bf16",
                "kv_cache_bytes_at_max_len_bf16"):
        pretty[key] = _human(facts[key], "B")
    width = max(len(k) for k in pretty)
    for key, value in pretty.items():
        if value is not None and key != "seq_len":
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import lmstack.model as lm
    from lmstack.model import hf
    from lmstack.runtime import parse_dtype

    src, out = Path(args.src), Path(args.out)
    check_convert_target(src, out, force=args.force)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if (src / "model_config.json").is_file():
        from lmstack.tokenizer import has_tokenizer, load_tokenizer

        from lmstack.infer.text import load_model_folder  # the one loader: damaged files -> one line

        model = load_model_folder(src, "cpu", dtype)
        # With the tokenizer, the export also gets tokenizer_config.json + generation_config.json (EOS for HF).
        hf.save(model, out, tokenizer=load_tokenizer(src) if has_tokenizer(src) else None)
        direction = "lmstack -> Hugging Face"
    elif src.is_dir():
        from lmstack.infer.text import load_model_folder

        model = load_model_folder(src, "cpu", dtype)
        lm.save(model, out)
        direction = "Hugging Face -> lmstack"
    else:
        raise ConfigError(f"{src}: not a model folder (needs model_config.json or config.json)")
    tok_src = src if (src / "config.json").is_file() or (src / "model_config.json").is_file() else None
    copied = []
    for name in TOKENIZER_FILES:
        if tok_src is not None and (tok_src / name).is_file():
            shutil.copy2(tok_src / name, out / name)
            copied.append(name)
    print(f"{direction}: {src} -> {out} ({model.num_parameters():,} parameters, {model.config.arch}"
          f"{'; copied ' + ', '.join(copied) if copied else ''})")
    return 0


# The files a converted model folder holds; an existing OUT with anything else is somebody's data.
MODEL_FILES = frozenset({"model.safetensors", "model_config.json", "config.json", *TOKENIZER_FILES})


def check_convert_target(src: Path, out: Path, force: bool = False) -> None:
    """Refuse an OUT whose replacement would destroy data: SRC itself, a folder holding SRC, a file, or (unless
    ``force``) a folder with more than a model's files (a run directory keeps checkpoints and metrics)."""
    if not src.exists():
        raise ConfigError(f"{src}: no such model folder")
    if not out.exists():
        return
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents:
        raise ConfigError(f"OUT {out} is SRC or holds it; converting would overwrite the source: "
                          f"choose a new folder for OUT")
    if not out.is_dir():
        raise ConfigError(f"OUT {out} exists and is a file; choose a folder path for OUT (the file is kept)")
    extra = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES)
    if extra and not force:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        raise ConfigError(f"OUT {out} exists and is not a model folder (it holds {shown}); choose a new folder "
                          f"or pass --force to replace it")
