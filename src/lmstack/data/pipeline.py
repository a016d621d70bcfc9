"""``lmstack data prepare CONFIG``: sources -> clean -> dedup -> split -> tokenize -> mix -> shards + report.

Output folder (``out_dir``)::

    train/            the mixed training shard set (index.json + shard_*.bin), see lmstack.data.pack
    val/              held-out documents (``val_fraction`` of each source, by text hash, not re-weighted)
    tokenizer/        the tokenizer the shards were made with (given, loaded or trained here)
    data_report.md    documents in/out per step, removal reasons with examples, duplicate clusters,
                      the mix table, tokens per source, shard sizes
    report.json       the same figures as data; ``render_report(read_json(...))`` rebuilds the Markdown
    config.json       the resolved config

Streaming: documents pass through cleaning and dedup one at a time and are written to a work folder;
only dedup signatures, per-document token counts and the mix order are held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmstack.config import to_dict
from lmstack.data.clean import DEFAULT_CHAINS, STEP_NAMES, CleanConfig, StepStats, apply_steps, build_steps
from lmstack.data.dedup import DedupConfig
from lmstack.data.mix import MixConfig, plan_mix
from lmstack.data.pack import ShardWriter, token_dtype, tokenize_stream
from lmstack.data.sources import Document, iter_source
from lmstack.data.split import is_heldout
from lmstack.errors import ConfigError, DataError
from lmstack.runs import Progress, atomic_write_json, atomic_write_text


@dataclass
class SourceConfig:
    name: str = ""
    paths: list[str] = field(default_factory=list)      # files, folders, globs (relative to ``root``)
    kind: Literal["auto", "text", "html", "book", "code"] = "auto"
    text_field: str = "text"                             # for JSONL/JSON/Parquet rows
    weight: float = 1.0                                  # epochs, or a token share (see mix.by)
    steps: list[str] | None = None                       # cleaning steps; None: the default chain per kind
    max_documents: int = 0                               # 0: all

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("sources[].name: every source needs a name")
        if not self.paths:
            raise ConfigError(f"sources.{self.name}.paths: list at least one file, folder or glob")
        if self.weight < 0:
            raise ConfigError(f"sources.{self.name}.weight: must be >= 0")


@dataclass
class TokenizerSource:
    path: str = ""        # a saved tokenizer folder (lmstack.tokenizer.load_tokenizer)
    vocab_size: int = 0   # > 0 and no path: train a byte-level BPE of this size on the cleaned training text
    pattern: str = "gpt4"


@dataclass
class PackConfig:
    shard_tokens: int = 50_000_000
    workers: int = 2
    chunk_docs: int = 64

    def __post_init__(self) -> None:
        if self.shard_tokens < 1 or self.workers < 1 or self.chunk_docs < 1:
            raise ConfigError("pack: shard_tokens, workers and chunk_docs must be >= 1")


@dataclass
class PrepareConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    out_dir: str = "runs/data"
    root: str = ""                 # prefix for relative source paths (default: the working directory)
    val_fraction: float = 0.01
    seed: int = 0
    max_examples: int = 2          # removed examples kept per step and reason
    keep_work: bool = False        # keep the cleaned JSONL and per-source token files in out_dir/work
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    tokenizer: TokenizerSource = field(default_factory=TokenizerSource)
    pack: PackConfig = field(default_factory=PackConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: add at least one [[sources]] table with a name and paths")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be distinct, got {names}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction: must be in [0, 1)")


def clean_and_split(docs: Iterable[Document], steps_for: Callable[[Document], list[Any]],
                    stats: dict[str, StepStats], val_fraction: float, seed: int = 0,
                    max_examples: int = 2) -> Iterator[tuple[Document, bool]]:
    """Clean and dedup a document stream (``steps_for(doc)`` gives each document's steps; ``stats`` fills by
    step name), then mark each survivor held out or not with :func:`is_heldout` on its cleaned text."""
    for doc in apply_steps(docs, steps_for, stats, max_examples):
        yield doc, is_heldout(doc.text, val_fraction, seed)


def _resolve(root: str, paths: list[str]) -> list[str]:
    if not root:
        return paths
    return [p if Path(p).is_absolute() else str(Path(root) / p) for p in paths]


def _get_tokenizer(config: PrepareConfig, train_files: list[Path]) -> Any:
    spec = config.tokenizer
    if spec.path:
        from lmstack.tokenizer import load_tokenizer

        return load_tokenizer(spec.path)
    if spec.vocab_size > 0:
        from lmstack.tokenizer import train_bpe

        files = [f for f in train_files if f.stat().st_size > 0]
        if not files:
            raise DataError("no training text survived cleaning, so no tokenizer can be trained")
        return train_bpe(files, spec.vocab_size, pattern=spec.pattern, workers=config.pack.workers)
    raise ConfigError("tokenizer: set tokenizer.path (a saved tokenizer) or tokenizer.vocab_size (train one here)")


def prepare(config: PrepareConfig, tokenizer: Any = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline (see the module docstring); return the report data (also in report.json).

    ``tokenizer``: an object with ``encode``/``encode_batch``, ``vocab_size``, ``eos_id`` (and ``save``);
    when None it comes from ``config.tokenizer``.
    """
    from lmstack.runs import remove_if_failed

    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config field 'out_dir': {out} exists and is a file; give a folder (the file is kept)")
    # a failed run leaves nothing half-made: no work files under their final names, no new out_dir
    with remove_if_failed(out):
        try:
            return _prepare(config, tokenizer, progress)
        except BaseException:
            shutil.rmtree(out / "work", ignore_errors=True)
            raise


def _prepare(config: PrepareConfig, tokenizer: Any, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(config.out_dir)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "clean").mkdir(parents=True)
    stats: dict[str, StepStats] = {}
    dedup_steps = config.dedup.make_steps(config.max_examples)
    per_source: dict[str, dict[str, Any]] = {}

    # 1. clean + dedup, streamed into work/clean/<source>.{train,val}.jsonl
    bar = Progress(None, desc="clean", unit="docs", disable=not progress)
    for src in config.sources:
        row = per_source[src.name] = {"kind": src.kind, "read": 0, "kept": 0, "train_docs": 0, "val_docs": 0,
                                      "chars_in": 0, "chars_out": 0}
        chains: dict[str, list[Any]] = {}

        def steps_for(doc: Document, src: SourceConfig = src, chains: dict = chains) -> list[Any]:
            if doc.kind not in chains:
                names = src.steps if src.steps is not None else DEFAULT_CHAINS[doc.kind]
                chains[doc.kind] = build_steps(config.clean, names) + dedup_steps
            return chains[doc.kind]

        def counted(docs: Iterator[Document], row: dict = row) -> Iterator[Document]:
            for d in docs:
                row["read"] += 1
                row["chars_in"] += len(d.text)
                bar.update(1)
                yield d

        docs = iter_source(_resolve(config.root, src.paths), src.name, src.kind, src.text_field, src.max_documents)
        with open(work / "clean" / f"{src.name}.train.jsonl", "w", encoding="utf-8") as ft, \
                open(work / "clean" / f"{src.name}.val.jsonl", "w", encoding="utf-8") as fv:
            for doc, val in clean_and_split(counted(docs), steps_for, stats, config.val_fraction, config.seed,
                                            config.max_examples):
                (fv if val else ft).write(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n")
                row["kept"] += 1
                row["val_docs" if val else "train_docs"] += 1
                row["chars_out"] += len(doc.text)
    bar.close()
    if not any(r["train_docs"] for r in per_source.values()):
        raise DataError("every document was removed by cleaning or dedup; see the step settings")

    # 2. tokenizer
    if tokenizer is None:
        tokenizer = _get_tokenizer(config, [work / "clean" / f"{s.name}.train.jsonl" for s in config.sources])
    if getattr(tokenizer, "eos_id", None) is None:
        raise DataError("the tokenizer has no end-of-text token (eos_id); documents need a separator")
    vocab_size, eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
    dtype = token_dtype(vocab_size)
    if hasattr(tokenizer, "save"):
        tok_dir = out / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        tokenizer.save(tok_dir)

    # 3. tokenize: train docs per source into work/tokens, val docs straight into the val shard set
    (work / "tokens").mkdir()
    lengths: list[np.ndarray] = []
    meta = {"tokenizer": str(out / "tokenizer"), "created_by": "lmstack data prepare"}
    bar = Progress(sum(r["kept"] for r in per_source.values()), desc="tokenize", unit="docs", disable=not progress)
    with ShardWriter(out / "val", vocab_size, eos_id, config.pack.shard_tokens, {**meta, "split": "val"}) as vw:
        for src in config.sources:
            row = per_source[src.name]
            lens = []
            with open(work / "tokens" / f"{src.name}.bin", "wb") as f:
                for ids in tokenize_stream(_read_jsonl_texts(work / "clean" / f"{src.name}.train.jsonl"), tokenizer,
                                           config.pack.workers, config.pack.chunk_docs):
                    f.write(ids.astype(dtype).tobytes())
                    lens.append(len(ids))
                    bar.update(1)
            lengths.append(np.array(lens, dtype=np.int64))
            row["train_tokens"] = int(lengths[-1].sum())
            row["val_tokens"] = 0
            for ids in tokenize_stream(_read_jsonl_texts(work / "clean" / f"{src.name}.val.jsonl"), tokenizer,
                                       config.pack.workers, config.pack.chunk_docs):
                vw.add(ids)
                row["val_tokens"] += len(ids)
                bar.update(1)
    bar.close()

    # 4. mix and write the training shards
    plan = plan_mix([s.name for s in config.sources], lengths, [s.weight for s in config.sources], config.mix)
    tokens = [np.memmap(work / "tokens" / f"{s.name}.bin", dtype=dtype, mode="r") if int(n.sum()) else
              np.zeros(0, dtype=dtype) for s, n in zip(config.sources, lengths)]
    starts = [np.concatenate([[0], np.cumsum(n)]) for n in lengths]
    with ShardWriter(out / "train", vocab_size, eos_id, config.pack.shard_tokens, {**meta, "split": "train"}) as tw:
        for s, d in plan.order:
            tw.add(tokens[s][starts[s][d]: starts[s][d + 1]])
    del tokens
    if not config.keep_work:
        shutil.rmtree(work, ignore_errors=True)

    dedup = {step.name: step.stats.to_dict() for step in dedup_steps}
    report = {
        "config": to_dict(config),
        "seconds": round(time.perf_counter() - t0, 2),
        "sources": per_source,
        "steps": [stats[n].to_dict() for n in sorted(stats, key=_step_order)],
        "dedup": dedup,
        "mix": {"table": plan.table(), "rows": [dataclasses.asdict(r) for r in plan.rows]},
        "shards": {"train": _shard_summary(tw.index), "val": _shard_summary(vw.index)},
        "tokenizer": {"vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype.name},
    }
    atomic_write_json(out / "config.json", to_dict(config))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "data_report.md", render_report(report))
    return report


def _step_order(name: str) -> int:
    order = list(STEP_NAMES) + ["exact_dedup", "near_dedup"]
    return order.index(name) if name in order else len(order)


def _read_jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _shard_summary(index: dict[str, Any]) -> dict[str, Any]:
    return {"shards": len(index["shards"]), "tokens": index["tokens"], "documents": index["documents"],
            "dtype": index["dtype"]}


# ---------------------------------------------------------------------------------------------------------
# The report

def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("<", "&lt;")


def step_table(steps: list[dict[str, Any]], examples: bool = True) -> str:
    """A Markdown table of cleaning/dedup steps (``StepStats.to_dict()`` rows): documents in and out, removals
    by reason and, with ``examples``, one removed text per reason."""
    head = "| step | in | out | removed | rewritten | removed by reason |" + (" example |" if examples else "")
    rule = "| --- | ---: | ---: | ---: | ---: | --- |" + (" --- |" if examples else "")
    out = [head, rule]
    for st in steps:
        removed = sum(st["removed"].values())
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(st["removed"].items(), key=lambda kv: -kv[1])) or "-"
        row = f"| {st['name']} | {st['docs_in']:,} | {st['docs_out']:,} | {removed:,} | {st['modified']:,} | {reasons} |"
        if examples:
            ex = [f"{e['reason']}: `{_quote(e['text'][:100])}`" for e in st.get("examples", [])[:2]]
            row += " " + ("<br>".join(ex) or "-") + " |"
        out.append(row)
    return "\n".join(out)


def render_report(r: dict[str, Any]) -> str:
    """``data_report.md`` from the report data (``report.json``)."""
    out = ["# Data report", ""]
    src_rows = r["sources"]
    read = sum(s["read"] for s in src_rows.values())
    kept = sum(s["kept"] for s in src_rows.values())
    tr, va = r["shards"]["train"], r["shards"]["val"]
    out += [f"{read:,} documents read, {kept:,} kept ({100 * kept / max(read, 1):.1f}%); "
            f"{tr['tokens']:,} training tokens in {tr['shards']} shard(s), {va['tokens']:,} validation tokens; "
            f"vocabulary {r['tokenizer']['vocab_size']:,} ({r['tokenizer']['dtype']}); {r['seconds']} s.", ""]
    out += ["## Sources", "",
            "| source | kind | read | kept | train docs | val docs | chars in | chars out | train tokens | val tokens |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in src_rows.items():
        out.append(f"| {name} | {s['kind']} | {s['read']:,} | {s['kept']:,} | {s['train_docs']:,} | "
                   f"{s['val_docs']:,} | {s['chars_in']:,} | {s['chars_out']:,} | {s.get('train_tokens', 0):,} | "
                   f"{s.get('val_tokens', 0):,} |")
    out += ["", "## Cleaning and dedup steps", "",
            "Each step sees the documents that passed the steps before it (the chain depends on the kind).", "",
            step_table(r["steps"], examples=False)]
    out += ["", "## Duplicate clusters", ""]
    if not r["dedup"]:
        out.append("Dedup was off.")
    for name, d in r["dedup"].items():
        out.append(f"- **{name}**: {d['clusters']:,} clusters, {d['removed']:,} documents removed")
        for ex in d["examples"]:
            sim = f" (estimated Jaccard {ex['similarity']})" if "similarity" in ex else ""
            out.append(f"  - kept: `{_quote(ex['kept'][:120])}`")
            out.append(f"    removed{sim}: `{_quote(ex['removed'][:120])}`")
    out += ["", "## Mix", "", r["mix"]["table"], "", "## Shards", "",
            "| split | shards | documents | tokens | dtype |", "| --- | ---: | ---: | ---: | --- |"]
    for split in ("train", "val"):
        s = r["shards"][split]
        out.append(f"| {split} | {s['shards']} | {s['documents']:,} | {s['tokens']:,} | {s['dtype']} |")
    out += ["", "## Examples of removed text", ""]
    any_ex = False
    for st in r["steps"]:
        for ex in st["examples"]:
            any_ex = True
            out.append(f"- **{st['name']} / {ex['reason']}** ({_quote(ex['origin'])}): `{_quote(ex['text'][:200])}`")
    if not any_ex:
        out.append("Nothing was removed.")
    return "\n".join(out) + "\n"

