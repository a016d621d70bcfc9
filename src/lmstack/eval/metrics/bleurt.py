"""Learned metrics, BLEURT-style (Sellam et al. 2020): an encoder reads ``[CLS] reference [SEP] candidate
[SEP]`` (token types 0 / 1) and a linear regression head on the first token predicts the human rating.

- :func:`train_metric` fine-tunes an encoder (default all-MiniLM-L6-v2) on (reference, candidate, rating)
  triples with a mean-squared-error loss on standardised ratings, and saves an lmstack model folder
  (``model.safetensors`` + ``model_config.json`` + ``tokenizer.json`` + ``metric.json``).
- ``compute_metric("bleurt", predictions, references, checkpoint=FOLDER)`` scores with such a folder, or
  with a BLEURT PyTorch checkpoint in the Hugging Face ``BertForSequenceClassification`` layout with one
  label (e.g. the community conversions of BLEURT-base), which :mod:`lmstack.model.hf` loads.
BLEURT's synthetic pre-training on perturbed Wikipedia pairs is not reproduced; fine-tuning starts
from the plain encoder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError, DataError
from lmstack.eval.metrics.base import MetricResult, empty_failures, register


@dataclass
class TrainMetricConfig:
    base: str | None = None          # encoder folder (Hugging Face or lmstack); default all-MiniLM-L6-v2
    epochs: int = 1
    lr: float = 3e-5
    batch_size: int = 16
    max_length: int = 256
    seed: int = 0
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("train-metric: epochs and batch_size must be >= 1 and lr > 0")


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json")
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def encode_pairs(tokenizer: Any, references: Sequence[str], candidates: Sequence[str], max_length: int,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, token types), each (B, T): reference first, candidate second, right-padded."""
    tokenizer.no_truncation()
    encs = tokenizer.encode_batch(list(zip(references, candidates)))
    rows = []
    for e in encs:
        ids, types = list(e.ids), list(e.type_ids)
        if len(ids) > max_length:  # keep [SEP] at the end; cut the longer text first would need re-encoding
            ids, types = ids[:max_length - 1] + ids[-1:], types[:max_length - 1] + types[-1:]
        rows.append((ids, types))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)], types[i, :len(t)] = torch.tensor(r), 1, torch.tensor(t)
    return ids, mask, types


def _with_head(base: Path) -> torch.nn.Module:
    """The base encoder with a fresh 1-output regression head (its weights kept)."""
    import dataclasses

    from lmstack.model import build_model, hf, load

    enc = load(base) if (base / "model_config.json").is_file() else hf.load(base)
    if enc.config.arch != "encoder":
        raise ConfigError(f"{base}: a learned metric needs an encoder, this is a {enc.config.arch!r}")
    cfg = dataclasses.replace(enc.config, n_labels=1, dropout=0.0)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(enc.state_dict(), strict=False)
    if unexpected or any(not k.startswith("classifier") for k in missing):
        raise ConfigError(f"{base}: weights do not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def train_metric(references: Sequence[str], candidates: Sequence[str], ratings: Sequence[float],
                 out: str | os.PathLike, cfg: TrainMetricConfig | None = None) -> dict[str, Any]:
    """Fine-tune a regression metric on human ratings; returns the training summary (losses per epoch)."""
    from lmstack.model import save
    from lmstack.runs import atomic_write_json
    from lmstack.runtime import seed_everything

    cfg = cfg or TrainMetricConfig()
    if not len(references) == len(candidates) == len(ratings) or not ratings:
        raise DataError(f"train-metric: {len(references)} references, {len(candidates)} candidates and "
                        f"{len(ratings)} ratings: need the same non-zero count")
    from lmstack.eval.metrics.bertscore import default_encoder_path

    base = Path(cfg.base) if cfg.base else default_encoder_path()
    seed_everything(cfg.seed)
    model = _with_head(base)
    tok = _tokenizer(base)
    y = np.asarray(ratings, dtype=np.float64)
    mean, std = float(y.mean()), float(y.std() or 1.0)
    target = torch.tensor((y - mean) / std, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(ratings), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            ids, mask, types = encode_pairs(tok, [references[i] for i in idx], [candidates[i] for i in idx],
                                            cfg.max_length, model.config.pad_token_id or 0)
            pred = model.classify(ids, attention_mask=mask, token_type_ids=types)[:, 0]     # (B,)
            loss = F.mse_loss(pred, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(ratings))
    model.eval()
    out = Path(out)
    save(model, out)
    shutil.copyfile(base / "tokenizer.json", out / "tokenizer.json")
    summary = {"kind": "bleurt-style", "base": str(base), "rating_mean": mean, "rating_std": std,
               "max_length": cfg.max_length, "train_mse_per_epoch": losses, "examples": len(ratings)}
    atomic_write_json(out / "metric.json", summary)
    return summary


def load_metric_model(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    from lmstack.model import hf, load

    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such learned-metric folder")
    model = load(folder) if (folder / "model_config.json").is_file() else hf.load(folder)
    if getattr(model, "classifier", None) is None or model.config.n_labels != 1:
        raise ConfigError(f"{folder}: not a regression metric (needs an encoder with a 1-label head)")
    meta = json.loads((folder / "metric.json").read_text(encoding="utf-8")) if (folder / "metric.json").is_file() else {}
    return model.eval(), _tokenizer(folder), meta


@register("bleurt", scale="rating scale of the training data")
def bleurt(predictions: list[str], references: list[list[str]], sources=None, *, checkpoint: str | None = None,
           batch_size: int = 16, max_length: int | None = None, on_empty: str = "record") -> MetricResult:
    """A learned BLEURT-style metric (``checkpoint=``: a train-metric folder or a BLEURT PyTorch checkpoint)."""
    if checkpoint is None:
        raise ConfigError("bleurt needs checkpoint= (train one with `lmstack eval train-metric`)")
    failures = empty_failures(predictions, on_empty)
    model, tok, meta = load_metric_model(checkpoint)
    max_length = max_length or int(meta.get("max_length", model.config.max_seq_len))
    mean, std = float(meta.get("rating_mean", 0.0)), float(meta.get("rating_std", 1.0))
    pairs = [(i, r, p) for i, (p, refs) in enumerate(zip(predictions, references)) for r in refs]
    values = np.full(len(predictions), -np.inf)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            ids, mask, types = encode_pairs(tok, [c[1] for c in chunk], [c[2] for c in chunk], max_length,
                                            model.config.pad_token_id or 0)
            scores = model.classify(ids, attention_mask=mask, token_type_ids=types)[:, 0].float() * std + mean
            for (i, _, _), s in zip(chunk, scores.tolist()):
                values[i] = max(values[i], s)  # best reference
    per_item = values.tolist()
    return MetricResult("bleurt", float(np.mean(per_item)) if per_item else float("nan"), per_item,
                        {"checkpoint": str(checkpoint)}, failures)
