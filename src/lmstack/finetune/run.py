"""``finetune(config)``: SFT of a pre-trained model with one method, on the one trainer loop.

The methods differ only in which parameters train (the loss is always the CLM loss on assistant tokens):

- ``full``: every parameter;
- ``lora``: low-rank A, B on the targeted linears (base frozen);
- ``qlora``: the same on a base whose block linears are stored in int8/int4/NF4 (:mod:`.quant`);
- ``prefix``: virtual K/V per layer (:mod:`.prefix`); ``adapter``: bottleneck adapters (:mod:`.adapter`).

The run directory::

    RUN/config.json, RUN/metrics.jsonl, RUN/checkpoints/step_N/   (the trainer's)
    RUN/adapter.safetensors + RUN/adapter_config.json              (lora/qlora/prefix/adapter: the trained part)
    RUN/model.safetensors + RUN/model_config.json                  (full fine-tuning)
    RUN/tokenizer.json, RUN/summary.json, RUN/report.md            (loss before/after, sizes, samples)

``adapter_config.json`` records the method, its config, the base's model config and a fingerprint of its
token embeddings: :func:`load_adapter` refuses a base that differs, naming the field.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmstack.config import from_dict, to_dict
from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.finetune.adapter import AdapterConfig, add_adapters
from lmstack.finetune.lora import LoraConfig, add_lora, adapter_state_dict, load_adapter_state, merge_and_unload
from lmstack.finetune.prefix import PrefixConfig, add_prefix
from lmstack.finetune.quant import base_bytes, quantize_base
from lmstack.runs import atomic_path, atomic_write_json, atomic_write_text, read_json

METHODS = ("full", "lora", "qlora", "prefix", "adapter")


@dataclass
class QuantConfig:
    mode: Literal["int8", "int4", "nf4"] = "nf4"
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "int4", "nf4"):
            raise ConfigError(f"quant.mode: must be int8, int4 or nf4, got {self.mode!r}")
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"quant.group_size: must be an even number >= 2, got {self.group_size}")


@dataclass
class SFTDataConfig:
    train: list[str] = field(default_factory=list)    # JSONL/JSON/Parquet files, folders, globs; empty = default data
    valid: list[str] = field(default_factory=list)    # empty = hold out ``valid_fraction`` of train
    valid_fraction: float = 0.05
    max_len: int = 256                                 # tokens per example (longer ones are truncated)
    max_examples: int | None = None                    # read at most this many rows of train
    default_rows: int = 4000                           # size of the generated default data

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"data.max_len: must be >= 2, got {self.max_len}")
        if not 0.0 < self.valid_fraction < 0.5:
            raise ConfigError(f"data.valid_fraction: must be in (0, 0.5), got {self.valid_fraction}")


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    base: str = ""                      # lmstack model folder / run dir, or a Hugging Face folder
    tokenizer: str = ""                 # tokenizer.json or folder; default: the base folder's
    method: Literal["full", "lora", "qlora", "prefix", "adapter"] = "lora"
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None             # None = the method's default (full 1e-4, prefix 1e-2, others 2e-3)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    log_every: int = 10
    eval_every: int = 0                 # 0 = only at the end
    ckpt_every: int = 0
    n_samples: int = 3                  # held-out prompts answered before and after (greedy)
    sample_tokens: int = 48
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"full": 1e-4, "prefix": 1e-2}.get(self.method, 2e-3)


# ----------------------------------------------------------------------------------------------------
# base model and tokenizer


def load_base(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """An lmstack model folder (``model_config.json``) or a Hugging Face folder (``config.json``)."""
    p = Path(path)
    if not str(path):
        raise ConfigError("base: name the pre-trained model folder to fine-tune")
    check_base_exists(p)
    from lmstack.infer.text import find_model_folder, load_model_folder

    try:
        folder = find_model_folder(p)
    except LmstackError:
        raise ConfigError(f"base: {p} holds no model (neither model_config.json (lmstack) nor config.json "
                          f"(Hugging Face), also not in model/ or final/)") from None
    # The same loader as generate/chat/eval: a damaged safetensors or config gives one line, not a traceback.
    return load_model_folder(folder, device, torch.float32)


def check_base_exists(p: Path) -> None:
    if not p.exists():
        raise ConfigError(f"base: {p} does not exist; name a model folder (an lmstack model, e.g. runs/speedrun/"
                          f"pretrain after 'lmstack speedrun', or a Hugging Face folder)")
    if not p.is_dir():
        raise ConfigError(f"base: {p} is not a folder; name the model folder")


def load_sft_tokenizer(cfg: FinetuneConfig):
    from lmstack.tokenizer import load_tokenizer

    if cfg.base:
        check_base_exists(Path(cfg.base))
    for cand in ([cfg.tokenizer] if cfg.tokenizer else [cfg.base, str(Path(cfg.base).parent)]):
        p = Path(cand)
        if (p / "tokenizer.json").is_file() or (p.is_file() and p.suffix == ".json"):
            return load_tokenizer(p)
    raise ConfigError(f"tokenizer: no tokenizer.json next to the base {cfg.base}; set tokenizer = PATH")


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the token embeddings: tells two checkpoints of the same architecture apart."""
    emb = model.embed.tok.weight if hasattr(model, "embed") else next(model.parameters())
    return hashlib.sha256(emb.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# methods: apply, save, load


def apply_method(model: nn.Module, method: str, cfg: FinetuneConfig, name: str = "default") -> dict[str, Any]:
    """Make ``model`` ready to train with ``method`` (in place); returns what was added."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return {}
    if method == "qlora":
        n = quantize_base(model, cfg.quant.mode, cfg.quant.group_size)
        return {"quantized_linears": n, "lora": add_lora(model, cfg.lora, name)}
    if method == "lora":
        return {"lora": add_lora(model, cfg.lora, name)}
    if method == "prefix":
        add_prefix(model, cfg.prefix)
        return {"n_prefix": cfg.prefix.n_prefix}
    if method == "adapter":
        return {"adapters": add_adapters(model, cfg.adapter)}
    raise ConfigError(f"method: unknown {method!r}; use one of {', '.join(METHODS)}")


def method_config(cfg: FinetuneConfig) -> dict[str, Any]:
    sections = {"lora": ["lora"], "qlora": ["lora", "quant"], "prefix": ["prefix"], "adapter": ["adapter"]}
    return {s: to_dict(getattr(cfg, s)) for s in sections.get(cfg.method, [])}


def trainable_state(model: nn.Module, method: str, name: str = "default") -> dict[str, torch.Tensor]:
    if method in ("lora", "qlora"):
        return adapter_state_dict(model, name)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, folder: str | os.PathLike, cfg: FinetuneConfig, base_config: dict[str, Any],
                 fingerprint: str, name: str = "default") -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` (method, its config, the base it fits)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in trainable_state(model, cfg.method, name).items()}
    with atomic_path(folder / "adapter.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_json(folder / "adapter_config.json", {
        # Absolute: the run must find its base from any working directory.
        "method": cfg.method, "config": method_config(cfg), "base": str(Path(cfg.base).resolve()),
        "base_config": base_config,
        "base_fingerprint": fingerprint})
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default", check_base: bool = True
                 ) -> dict[str, Any]:
    """Apply the method recorded in ``folder`` to ``model`` (the plain base) and load its weights.

    Raises :class:`LmstackError` naming the mismatch when the adapter was trained on another base
    (different model config; or, with ``check_base``, different embedding weights). LoRA adapters
    can be loaded several times under different ``name``s and switched with ``set_adapter``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise DataError(f"{folder}: no adapter_config.json (is this a fine-tuning run directory?)")
    meta = read_json(folder / "adapter_config.json")
    want, have = meta["base_config"], to_dict(model.config)
    diff = [f"{k}={want[k]!r} (this base: {have.get(k)!r})" for k in sorted(want) if want[k] != have.get(k)]
    if diff:
        raise LmstackError(f"{folder}: the adapter was trained for a different base model: {', '.join(diff[:4])}")
    if check_base and meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(model):
        raise LmstackError(f"{folder}: the adapter was trained on a different checkpoint of this architecture "
                           f"(embedding fingerprint {meta['base_fingerprint']} != {base_fingerprint(model)}); "
                           f"pass check_base=False to load it anyway")
    sections = meta["config"]
    cfg = from_dict(FinetuneConfig, {"method": meta["method"], **sections})
    state = load_file(str(folder / "adapter.safetensors"))
    if cfg.method in ("lora", "qlora"):
        apply_method(model, cfg.method, cfg, name)
        load_adapter_state(model, state, name)
    else:
        apply_method(model, cfg.method, cfg, name)
        own = dict(model.named_parameters())
        missing = [k for k in state if k not in own]
        if missing:
            raise LmstackError(f"{folder}: adapter tensors {missing[:3]} do not exist on this model")
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise LmstackError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, the model's is "
                                       f"{tuple(own[k].shape)}")
                own[k].copy_(v)
    return meta


def _bundle_run(run_dir: Path, out: Path, meta: dict[str, Any], base: str | None, hf_format: bool) -> Path:
    """Prefix-tuning and adapter runs add modules, so they cannot fold into the base weights: write one folder
    holding the base model and the adapter, which ``load_run`` (generate, chat, eval) loads directly."""
    import shutil

    from lmstack.infer.text import adapter_base, find_model_folder

    if hf_format:
        raise LmstackError(f"{run_dir}: a {meta['method']} run adds modules transformers' Llama/GPT-2 classes do "
                           f"not have, so it has no Hugging Face form; merge without --hf")
    base_dir = find_model_folder(Path(base).resolve() if base else adapter_base(run_dir, meta))
    model = load_base(base_dir)
    load_adapter(model, run_dir)  # checks that the adapter fits this base before anything is written
    from lmstack.model import save

    save(load_base(base_dir), out)
    shutil.copyfile(run_dir / "adapter.safetensors", out / "adapter.safetensors")
    atomic_write_json(out / "adapter_config.json", {**meta, "base": str(out.resolve())})
    for name in ("tokenizer.json", "tokenizer_vocab.txt"):
        src = run_dir / name if (run_dir / name).is_file() else base_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    return out


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, hf_format: bool = False
              ) -> Path:
    """Fold a LoRA/QLoRA run's adapter into its base and write a plain model (ours, or HF with ``hf_format``)."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "adapter_config.json") if (run_dir / "adapter_config.json").is_file() else None
    if meta is None:
        raise DataError(f"{run_dir}: no adapter_config.json to merge (full fine-tuning runs are already merged)")
    if meta["method"] not in ("lora", "qlora"):
        return _bundle_run(run_dir, Path(out), meta, base, hf_format)
    model = load_base(base or meta["base"])
    load_adapter(model, run_dir)
    merge_and_unload(model)
    out = Path(out)
    if hf_format:
        from lmstack.model import hf
        from lmstack.tokenizer import has_tokenizer, load_tokenizer

        hf.save(model, out, tokenizer=load_tokenizer(run_dir) if has_tokenizer(run_dir) else None)
    else:
        from lmstack.model import save

        save(model, out)
    if (run_dir / "tokenizer.json").is_file():
        import shutil

        shutil.copyfile(run_dir / "tokenizer.json", out / "tokenizer.json")
    return out


# ----------------------------------------------------------------------------------------------------
# generation for before/after samples


@torch.no_grad()
def chat_reply(model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int = 48,
               device: torch.device | str = "cpu") -> str:
    """Greedy reply to ``messages`` (:func:`lmstack.infer.text.complete`), stopping at ``<|end|>``; the
    newest turns are kept when the chat outgrows the context. ``device`` is unused (the model's is taken)."""
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import complete, fitting_budget

    budget = fitting_budget(model, max_tokens)
    return complete(model, tokenizer, messages, GenerationConfig(max_new_tokens=budget)).text


# ----------------------------------------------------------------------------------------------------
# the job


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def prepare_sft_data(cfg: FinetuneConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """(train examples, held-out examples, stats); generates the default data when none is given."""
    from lmstack.finetune.sft import build_default_sft, load_examples, split_heldout

    d = cfg.data
    train_paths, valid_paths = list(d.train), list(d.valid)
    if not train_paths:
        folder = Path(cfg.run_dir) / "sft_data"
        if not (folder / "train.jsonl").is_file():
            build_default_sft(folder, d.default_rows, d.valid_fraction)
        train_paths, valid_paths = [str(folder / "train.jsonl")], [str(folder / "valid.jsonl")]
    train, stats = load_examples(train_paths, tokenizer, d.max_len, d.max_examples)
    if valid_paths:
        held, vstats = load_examples(valid_paths, tokenizer, d.max_len)
        stats["valid_examples"] = vstats["examples"]
    else:
        train, held = split_heldout(train, d.valid_fraction, cfg.seed)
    stats.update(train_examples=len(train), heldout_examples=len(held), train_paths=train_paths,
                 valid_paths=valid_paths or "held out of train")
    return train, held, stats


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.base`` on the SFT data with ``cfg.method``; write the run directory; return the summary."""
    from lmstack.runs import list_checkpoints, remove_if_failed

    with remove_if_failed(cfg.run_dir, keep=lambda run: bool(list_checkpoints(run))):  # no empty run on failure
        return _finetune(cfg, resume)


def _finetune(cfg: FinetuneConfig, resume: bool) -> dict[str, Any]:
    from lmstack.finetune.sft import SFTLoader, eval_batches, heldout_loss
    from lmstack.runtime import resolve_device, seed_everything
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer

    if cfg.base:
        check_base_exists(Path(cfg.base))  # before the run folder exists: a typo leaves nothing behind
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tokenizer = load_sft_tokenizer(cfg)
    tokenizer.save(run)
    model = load_base(cfg.base, device)
    base_config, fingerprint = to_dict(model.config), base_fingerprint(model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer: {tokenizer.vocab_size} ids but the base model has vocab_size="
                          f"{model.config.vocab_size}; use the tokenizer the base was trained with")
    train, held, data_stats = prepare_sft_data(cfg, tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    prompts = [_prompt_of(ex, tokenizer) for ex in held[: cfg.n_samples]]

    loss_base = heldout_loss(model, held, cfg.batch_size, pad, device)
    before = [chat_reply(model, tokenizer, m, cfg.sample_tokens, device) for m in prompts]
    base_bytes_full = base_bytes(model)
    added = apply_method(model, cfg.method, cfg)
    model.to(device)
    loss_start = heldout_loss(model, held, cfg.batch_size, pad, device)
    from lmstack.finetune.quant import QuantLinear

    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # quantized weights are buffers, not parameters, but they are still the model's weights
    n_total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    frozen_bytes = base_bytes(model)

    tcfg = TrainConfig(run_dir=str(run), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, steps=cfg.steps,
                       batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                       eval_every=cfg.eval_every, eval_batches=max(1, len(held)), ckpt_every=cfg.ckpt_every,
                       sample_prompts=[], model={"vocab_size": model.config.vocab_size},
                       data=DataConfig(seq_len=cfg.data.max_len),
                       optim=OptimConfig(lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                         warmup_steps=min(cfg.warmup_steps, cfg.steps), schedule=cfg.schedule))

    def save_weights(m: nn.Module, folder: Path) -> None:
        if cfg.method == "full":
            from lmstack.model import save

            save(m, folder)
        else:
            save_adapter(m, folder, cfg, base_config, fingerprint)

    def load_weights(m: nn.Module, folder: Path) -> None:
        from safetensors.torch import load_file

        if cfg.method == "full":
            from safetensors.torch import load_model

            load_model(m, str(folder / "model.safetensors"))
            return
        state = load_file(str(folder / "adapter.safetensors"))
        if cfg.method in ("lora", "qlora"):
            load_adapter_state(m, state)
        else:
            m.load_state_dict(state, strict=False)

    task = Task(model=model, loader=SFTLoader(train, cfg.batch_size, pad, cfg.seed),
                eval_batches=lambda: eval_batches(held, cfg.batch_size, pad), tokenizer=tokenizer,
                save_weights=save_weights, load_weights=load_weights)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = Trainer(tcfg, resume=resume, task=task)
    try:
        summary = trainer.fit()
        opt_bytes = _optimizer_state_bytes(trainer.optimizer)
    finally:
        trainer.close()
    seconds = time.perf_counter() - t0
    loss_after = heldout_loss(model, held, cfg.batch_size, pad, device)
    after = [chat_reply(model, tokenizer, m, cfg.sample_tokens, device) for m in prompts]
    results = {
        "method": cfg.method, "base": cfg.base, "steps": cfg.steps, "lr": cfg.learning_rate,
        "heldout_loss_base": round(loss_base, 4), "heldout_loss_start": round(loss_start, 4),
        "heldout_loss_after": round(loss_after, 4),
        "params_total": n_total, "params_trainable": n_trainable,
        "trainable_fraction": round(n_trainable / max(n_total, 1), 6),
        "base_bytes_fp32": base_bytes_full, "frozen_base_bytes": frozen_bytes,
        "optimizer_state_bytes": opt_bytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss(),
        "tokens_per_s": summary.get("tokens_per_s"), "train_seconds": round(seconds, 2),
        "tokens": summary.get("tokens"), "added": added, "data": data_stats,
        "pad_fraction": round(task.loader.pad_fraction(), 4),
        "samples": [{"prompt": m[-1]["content"], "before": b, "after": a} for m, b, a in zip(prompts, before, after)],
    }
    atomic_write_json(run / "summary.json", results)
    atomic_write_text(run / "report.md", render_report(results))
    print(f"[finetune] {cfg.method}: held-out loss {loss_base:.3f} -> {loss_after:.3f} "
          f"({n_trainable:,} of {n_total:,} parameters trained) -> {run}", file=sys.stderr)
    return results


def _prompt_of(example, tokenizer) -> list[dict[str, str]]:
    """The user turn of a tokenized single-turn example (decoded back from its ids)."""
    user = tokenizer.special_tokens["<|user|>"]
    end = tokenizer.special_tokens["<|end|>"]
    ids = example.input_ids
    start = ids.index(user) + 1 if user in ids else 0
    stop = ids.index(end, start) if end in ids[start:] else len(ids)
    return [{"role": "user", "content": tokenizer.decode(ids[start:stop])}]


def _peak_rss() -> int:
    """The process's peak resident memory (bytes): a whole-process figure on CPU."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def render_report(r: dict[str, Any]) -> str:
    lines = [f"Method **{r['method']}**, {r['steps']} steps at lr {r['lr']:g} on "
             f"{r['data']['train_examples']:,} examples; held-out {r['data']['heldout_examples']:,} examples.", "",
             "| held-out loss (base) | (method applied, before training) | (after) | trainable / total params "
             "| frozen base MB | optimizer state MB | tokens/s |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {r['heldout_loss_base']:.3f} | {r['heldout_loss_start']:.3f} | {r['heldout_loss_after']:.3f} "
             f"| {r['params_trainable']:,} / {r['params_total']:,} ({100 * r['trainable_fraction']:.2f}%) "
             f"| {_mb(r['frozen_base_bytes'])} | {_mb(r['optimizer_state_bytes'])} | {r['tokens_per_s']} |", ""]
    for s in r["samples"]:
        lines += [f"**Prompt:** {s['prompt']}", "", f"- before: {s['before'][:300]!r}",
                  f"- after: {s['after'][:300]!r}", ""]
    return "\n".join(lines)


def speedrun_base(run_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> tuple[Path, str]:
    """A speedrun stage's starting model and tokenizer: ``base`` (default the first of ``RUN/pretrain``,
    ``RUN/train``, ``RUN/model`` holding a model) and the base's tokenizer, else ``RUN/tokenizer.json``'s."""
    run = Path(run_dir)
    if base is None:
        found = [run / n for n in ("pretrain", "train", "model") if (run / n / "model_config.json").is_file()]
        if not found:
            raise DataError(f"{run}: no pre-trained model (RUN/pretrain/model_config.json); run the pretrain stage")
        base = found[0]
    base = Path(base)
    return base, str(base) if (base / "tokenizer.json").is_file() else str(run)


def speedrun_sft(run_dir: str | os.PathLike, base: str | os.PathLike | None = None, steps: int = 150,
                 method: str = "lora", **overrides: Any) -> tuple[dict[str, Any], str]:
    """The speedrun's SFT stage: LoRA on the pre-trained tiny model with the default SFT data.

    ``base`` defaults to the first of ``RUN/pretrain``, ``RUN/train``, ``RUN/model`` holding a model;
    the tokenizer is the base's or ``RUN/tokenizer.json``. Writes ``RUN/sft/``; returns the results and
    a markdown section (held-out loss before/after, sizes, before/after samples).
    """
    run = Path(run_dir)
    base, tok = speedrun_base(run, base)
    from lmstack.config import merge

    fields = {"run_dir": str(run / "sft"), "base": str(base), "tokenizer": tok, "method": method, "steps": steps,
              "data": {"default_rows": 2000, "max_len": 128}}
    cfg = from_dict(FinetuneConfig, merge(fields, overrides))
    results = finetune(cfg)
    return results, render_report(results)


def main_config(path: str | None, overrides: list[str]) -> FinetuneConfig:
    from lmstack.config import load_config

    return load_config(FinetuneConfig, path, overrides)


__all__ = ["FinetuneConfig", "SFTDataConfig", "QuantConfig", "finetune", "load_base", "apply_method", "save_adapter",
           "load_adapter", "merge_run", "chat_reply", "speedrun_sft"]
