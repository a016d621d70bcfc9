"""Pre-training objectives: one function per objective, from a block of token ids to a scalar loss.

- ``clm``: causal LM on a decoder, next-token cross-entropy on ``(x, y)`` (GPT).
- ``mlm``: masked LM on an encoder (BERT, Devlin et al. 2019): pick ``p`` of the tokens; of those 80%
  become ``[MASK]``, 10% a random token, 10% stay; the loss is on the picked tokens only.
- ``distill``: causal LM on a decoder against a frozen teacher's soft targets (:func:`kd_loss`).
- ``span``: span corruption on an encoder-decoder (T5, Raffel et al. 2020, section 3.1.4): replace
  random spans (``density`` of the tokens, mean length ``mean_len``) with sentinel ids in the encoder
  input; the decoder predicts ``<s_0> span_0 <s_1> span_1 ...``.

Randomness comes from a generator seeded from (seed, step, micro-step), never from the global RNG, so
a resumed run draws the same masks as an uninterrupted one and data-parallel ranks draw different ones.

The extra ids the objectives need (``[MASK]``, sentinels, the decoder's start id) are appended after
the tokenizer's vocabulary: see :func:`special_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError


@dataclass(frozen=True)
class SpecialIds:
    """Ids the objective adds after the tokenizer's ``base_vocab`` ids; ``vocab_size`` is the model's vocab."""

    base_vocab: int
    vocab_size: int
    mask: int | None = None             # mlm
    first_sentinel: int | None = None   # span: sentinels are first_sentinel + i
    n_sentinels: int = 0
    decoder_start: int | None = None    # span: the decoder's first input id


def span_counts(seq_len: int, density: float, mean_len: float) -> tuple[int, int]:
    """(noise tokens, spans) of a ``seq_len`` block: T5's ``round(L * density)`` and ``round(noise / mean_len)``."""
    n_noise = min(max(1, round(seq_len * density)), seq_len - 1)
    n_spans = max(1, min(round(n_noise / mean_len), n_noise, seq_len - n_noise))
    return n_noise, n_spans


def special_ids(objective: str, base_vocab: int, seq_len: int = 0, density: float = 0.15,
                mean_len: float = 3.0) -> SpecialIds:
    if objective in ("clm", "distill"):
        return SpecialIds(base_vocab, base_vocab)
    if objective == "mlm":
        return SpecialIds(base_vocab, base_vocab + 1, mask=base_vocab)
    if objective == "span":
        _, n_spans = span_counts(seq_len, density, mean_len)
        return SpecialIds(base_vocab, base_vocab + n_spans + 1, first_sentinel=base_vocab, n_sentinels=n_spans,
                          decoder_start=base_vocab + n_spans)
    raise ConfigError(f"objective: unknown objective {objective!r}; use clm, mlm, span or distill")


# ---------------------------------------------------------------------------------------------------------
# masked LM


def mlm_mask(tokens: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. tokens (B, T) -> (inputs (B, T), labels (B, T) with -100 where nothing is predicted).

    Random draws are made on the CPU generator (then moved), so they do not depend on the device.
    At least one token per row is picked, so no row has an empty loss.
    """
    shape = tokens.shape
    u = torch.rand(shape, generator=generator)
    picked = u < probability
    picked[torch.arange(shape[0]), u.argmin(dim=1)] = True                  # at least one per row
    action = torch.rand(shape, generator=generator)
    random_tok = torch.randint(0, vocab_size, shape, generator=generator)
    cpu = tokens.cpu()
    labels = torch.where(picked, cpu, torch.full_like(cpu, -100))
    inputs = cpu.clone()
    inputs[picked & (action < 0.8)] = mask_id                               # 80%: [MASK]
    swap = picked & (action >= 0.8) & (action < 0.9)                        # 10%: a random token
    inputs[swap] = random_tok[swap]                                         # 10%: unchanged
    return inputs.to(tokens.device), labels.to(tokens.device)


# ---------------------------------------------------------------------------------------------------------
# span corruption


def _random_segmentation(total: int, n_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Split ``total`` items into ``n_segments`` non-empty segments uniformly at random; lengths (n_segments,)."""
    cuts = torch.randperm(total - 1, generator=generator)[: n_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([total])])
    return bounds.diff()


def span_noise_mask(seq_len: int, density: float, mean_len: float, generator: torch.Generator) -> torch.Tensor:
    """A (seq_len,) bool mask of noise tokens: spans of noise alternating with kept text, text first (T5)."""
    n_noise, n_spans = span_counts(seq_len, density, mean_len)
    noise_lens = _random_segmentation(n_noise, n_spans, generator)
    keep_lens = _random_segmentation(seq_len - n_noise, n_spans, generator)
    lengths = torch.stack([keep_lens, noise_lens], dim=1).reshape(-1)       # keep, noise, keep, noise, ...
    is_noise = torch.tensor([False, True]).repeat(n_spans)
    return torch.repeat_interleave(is_noise, lengths)


def span_corrupt(tokens: torch.Tensor, ids: SpecialIds, density: float, mean_len: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5 span corruption. tokens (B, T) -> encoder inputs (B, T - noise + spans), decoder inputs and
    labels (B, noise + spans). Every row has the same counts, so the batch needs no padding.

    Encoder: ``text <s_0> text <s_1> ...``; labels: ``<s_0> span_0 <s_1> span_1 ...``; decoder inputs:
    the labels shifted right behind ``decoder_start``. (T5 also ends the labels with EOS; dropped here,
    as the block boundaries are arbitrary.)
    """
    b, t = tokens.shape
    cpu = tokens.cpu()
    enc_rows, lab_rows = [], []
    for row in cpu:
        noise = span_noise_mask(t, density, mean_len, generator)            # (T,)
        starts = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])    # first token of each span
        span_idx = starts.long().cumsum(0) - 1                              # which span a noise token is in
        sentinel = ids.first_sentinel + span_idx
        # encoder keeps text and the first token of each span (as its sentinel)
        enc = torch.where(starts, sentinel, row)[~noise | starts]
        # labels keep each span's tokens, each span preceded by its sentinel
        lab = torch.stack([torch.where(starts, sentinel, -1), row], dim=1)  # (T, 2): sentinel slot, token
        lab = lab[noise].reshape(-1)
        lab = lab[lab >= 0]
        enc_rows.append(enc)
        lab_rows.append(lab)
    enc_ids, labels = torch.stack(enc_rows), torch.stack(lab_rows)
    dec_in = torch.cat([torch.full((b, 1), ids.decoder_start, dtype=labels.dtype), labels[:, :-1]], dim=1)
    dev = tokens.device
    return enc_ids.to(dev), dec_in.to(dev), labels.to(dev)


# ---------------------------------------------------------------------------------------------------------
# the loss functions the trainer calls: loss_fn(model, x, y, generator) -> scalar


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def clm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """Next-token cross-entropy: x (B, T) input ids, y (B, T) the ids shifted by one (-100 = ignore)."""
    return model(x, targets=y)[1]


def make_loss_fn(objective: str, ids: SpecialIds, mlm_probability: float = 0.15, span_density: float = 0.15,
                 span_mean_len: float = 3.0) -> LossFn:
    """The loss function of an objective, closed over its special ids and rates."""
    if objective == "clm":
        return clm_loss
    if objective == "mlm":
        def mlm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            inputs, labels = mlm_mask(x, ids.mask, ids.base_vocab, mlm_probability, generator)
            return model(inputs, targets=labels)[1]
        return mlm_loss
    if objective == "span":
        def span_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            enc, dec, labels = span_corrupt(x, ids, span_density, span_mean_len, generator)
            return model(enc, decoder_input_ids=dec, targets=labels)[1]
        return span_loss
    raise ConfigError(f"objective: no loss function for {objective!r} here; use clm, mlm or span "
                      f"(distill: make_distill_loss_fn)")


# ---------------------------------------------------------------------------------------------------------
# held-out loss: the one definition (the trainer's val_loss, fine-tuning's held-out loss)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch on ``device``: a tensor, or a dict / tuple / list of them (task batches, e.g. preference pairs)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(x: Any) -> int:
    """Input tokens in a batch: a tensor's elements, or a dict's ``input_ids`` (every tensor under a key ending
    in ``input_ids``, e.g. ``chosen_input_ids`` and ``rejected_input_ids``), else 0."""
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, dict):
        return sum(v.numel() for k, v in x.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))
    return 0


def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A loss function returns a loss, or ``(loss, metrics)`` whose metrics (scalars) the trainer logs."""
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def loss_weight(x: torch.Tensor, y: torch.Tensor) -> int:
    """The number of predictions a batch's mean loss averages over, its weight in a held-out mean.

    Causal LM (``clm``, ``distill``, fine-tuning): the target tokens, ``(y != -100).sum()``, so padding and
    prompt tokens count nowhere. The encoder objectives draw their targets inside the loss: ``mlm`` predicts
    a random ``mlm_probability`` share of the block and ``span`` the same count in every row, so both are
    weighted by the block's tokens (``y`` holds no -100 in packed blocks, so the same formula gives it).
    """
    if not isinstance(y, torch.Tensor):  # a task batch (dicts of tensors) whose loss is a mean over examples
        first = next((v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None else 1
    return int((y != -100).sum())


def heldout_sums(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 batch_loss: Callable[[int, torch.Tensor, torch.Tensor], float | None],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(sum of weighted batch losses, sum of weights), float64, over ``batches``; ``batch_loss(i, x, y)``
    gives batch ``i``'s mean loss (None skips the batch). Summable over ranks before dividing."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        if device is not None:
            x, y = to_device(x, device), to_device(y, device)
        loss = batch_loss(i, x, y)
        if loss is None:
            continue
        w = loss_weight(x, y)
        total += torch.tensor([float(loss) * w, w], dtype=torch.float64)
    return total


def heldout_mean(total: torch.Tensor) -> float | None:
    """The token-weighted held-out loss from :func:`heldout_sums` (None when no batch counted)."""
    return float(total[0] / total[1]) if total[1] > 0 else None


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn | None = None,
                 device: torch.device | str | None = "cpu", seed: int = 0) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (``loss_fn`` defaults to the CLM loss), in eval
    mode; what ``Trainer.evaluate`` logs as ``val_loss`` for the same model and batches."""
    loss_fn = loss_fn or clm_loss
    was = model.training
    model.eval()
    try:
        total = heldout_sums(batches, lambda i, x, y: loss_fn(model, x, y, step_generator(seed, -1, i)).item(),
                             device)
    finally:
        model.train(was)
    mean = heldout_mean(total)
    return mean if mean is not None else 0.0


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The generator for one micro-batch: a pure function of (seed, step, micro-step, rank)."""
    mixed = (seed * 1_000_003 + step * 1009 + micro * 101 + rank * 7) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def tokens_per_example(objective: str, seq_len: int, density: float = 0.15, mean_len: float = 3.0) -> int:
    """Tokens a model processes per example (for throughput): encoder + decoder lengths for span."""
    if objective == "span":
        n_noise, n_spans = span_counts(seq_len, density, mean_len)
        return (seq_len - n_noise + n_spans) + (n_noise + n_spans)
    return seq_len



# ---------------------------------------------------------------------------------------------------------
# knowledge distillation


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward") -> torch.Tensor:
    """Token-level knowledge distillation mixed with the hard-label loss, averaged over target tokens.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": with p = softmax(teacher / T) and
    q = softmax(student / T),

        loss = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(student, y)              (kind = "forward")

    where ``T^2`` keeps the soft term's gradient scale independent of T. ``kind = "reverse"`` uses
    KL(q || p) instead, the mode-seeking divergence of MiniLLM (Gu et al. 2023), which keeps a small
    student from spreading mass over everything the teacher finds plausible. Positions whose target is
    -100 (padding, prompt tokens) count in neither term. Logits are (B, T, V), targets (B, T).
    """
    if kind not in ("forward", "reverse"):
        raise ValueError(f"kd kind {kind!r}: use forward or reverse")
    mask = targets != -100                                                   # (B, T)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)         # log q
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)         # log p
    if kind == "forward":
        kl = (t.exp() * (t - s)).sum(-1)                                     # KL(p || q) per position
    else:
        kl = (s.exp() * (s - t)).sum(-1)                                     # KL(q || p)
    n = mask.sum().clamp(min=1)
    soft = (kl * mask).sum() / n * temperature ** 2
    if alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)
    return alpha * soft + (1 - alpha) * hard


def kd_loss_topk(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 targets: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """:func:`kd_loss` (forward KL) against a teacher known only by its top-k logits per position.

    ``teacher_values`` / ``teacher_indices`` (B, T, K) are the teacher's K largest logits and their token
    ids. The approximation: the teacher distribution is the softmax of those K logits at temperature T,
    renormalised over them (the tokens outside the top k get probability 0), so

        KL = sum_{i in top-k} p_i (log p_i - log q_i),   p = softmax(values / T),  q = softmax(student / T)

    with q over the whole vocabulary. With K = the vocabulary this is :func:`kd_loss` exactly (up to float
    summation order); with K < V the soft term ignores the teacher's tail (mass it puts outside its top k).
    """
    mask = targets != -100
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices.long())
    t = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    n = mask.sum().clamp(min=1)
    soft = (kl * mask).sum() / n * temperature ** 2
    if alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)
    return alpha * soft + (1 - alpha) * hard


class TeacherTopK:
    """The teacher's top-k logits per training block, computed the first time a block is seen and then reused.

    A training block (a row of ``x``) is identified by its token ids (a hash of its bytes), so the cache
    needs nothing from the loader and is the same under any batch order or resume. Memory: ``K * (4 + 4)``
    bytes per token of every distinct block seen (fp32 logits, int32 ids); the teacher runs once per
    distinct block instead of once per step, which pays from the second epoch on (or when several students
    share one cache). ``hits`` / ``misses`` count blocks.
    """

    def __init__(self, teacher: nn.Module, k: int):
        self.teacher, self.k = teacher, k
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        import hashlib

        return hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest()

    @torch.no_grad()
    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) (B, T, K) for the blocks ``x`` (B, T), running the teacher on the new ones only."""
        keys = [self._key(row) for row in x]
        new = [i for i, key in enumerate(keys) if key not in self.store]
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            logits = self.teacher(x[new]).float()
            values, indices = logits.topk(min(self.k, logits.shape[-1]), dim=-1)
            for j, i in enumerate(new):
                self.store[keys[i]] = (values[j].cpu(), indices[j].to(torch.int32).cpu())
        vals, idx = zip(*(self.store[key] for key in keys))
        return torch.stack(vals).to(x.device), torch.stack(idx).to(x.device)


def make_distill_loss_fn(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                         kind: str = "forward", cache_topk: int = 0) -> LossFn:
    """A CLM loss function for the trainer whose soft targets come from ``teacher`` (frozen): run on the fly
    under ``no_grad`` on the same batch, or, with ``cache_topk = K``, its top-K logits per block from a
    :class:`TeacherTopK` cache (forward KL only, :func:`kd_loss_topk`); the cache is ``loss_fn.cache``."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cache_topk:
        if kind != "forward":   # TrainConfig refuses this combination with a one-line error
            raise ValueError("the top-k teacher cache serves forward KL only")
        cache = TeacherTopK(teacher, cache_topk)

        def cached_distill_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                generator: torch.Generator | None = None) -> torch.Tensor:
            values, indices = cache.lookup(x)
            return kd_loss_topk(model(x), values, indices, y, temperature, alpha)

        cached_distill_loss.cache = cache  # type: ignore[attr-defined]
        return cached_distill_loss

    def distill_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature, alpha, kind)

    return distill_loss
