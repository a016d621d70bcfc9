"""Rollouts: sampled responses to prompts from the one engine, packed for a policy loss.

:func:`generate_rollouts` renders each item's prompt with the chat template (:func:`lmstack.align.rl_data.
prompt_ids`) and samples ``num_samples`` responses per prompt with :func:`lmstack.infer.text.complete_batch`
(a static batch of every prompt x sample, left-padded, KV-cached; stop at the end-of-turn token), timing
it: rollouts are most of the wall-clock of online RL, so their seconds and tokens/s are logged.

:func:`pack` lays the samples out in the trainer's shifted layout (``x = prompt + response[:-1]``, ``y`` the
next ids with -100 on the prompt and the padding, right-padded), so :func:`lmstack.align.logps.token_logps`
scores exactly the response tokens; :func:`response_logps` computes them (no gradient) for the rollout
policy ("old" log-probs) and the reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmstack.align.logps import IGNORE, token_logps
from lmstack.align.rl_data import Item, prompt_ids
from lmstack.infer.config import GenerationConfig


@dataclass
class Rollouts:
    """``num_samples`` responses per prompt, grouped by prompt (sample ``i`` answers prompt ``group[i]``)."""

    items: list[Item]                 # the prompt row of each sample
    group: list[int]                  # prompt index of each sample
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]     # generated ids, a final stop token included
    texts: list[str]                  # decoded responses (special tokens dropped)
    finish_reasons: list[str]
    seconds: float                    # wall-clock of the generation

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def __len__(self) -> int:
        return len(self.texts)


def sampling_config(max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, num_samples: int = 1) -> GenerationConfig:
    """The rollout policy: sampling from ``softmax(logits / temperature)``; the losses score tokens under the
    same tempered distribution. Keep ``top_p`` at 1 for exact ratios (a truncated sampler is not the
    distribution the loss scores)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, num_return_sequences=num_samples)


def generate_rollouts(model: nn.Module, tokenizer: Any, items: Sequence[Item], config: GenerationConfig,
                      batch_size: int | None = None) -> Rollouts:
    """Responses to ``items`` (``config.num_return_sequences`` each), ``batch_size`` prompts per engine call
    (None: all at once)."""
    from lmstack.infer.text import chat_config, complete_batch

    items = list(items)
    ids = [prompt_ids(tokenizer, it) for it in items]
    cfg = chat_config(tokenizer, config)
    per = cfg.num_return_sequences
    step = batch_size or len(items)
    t0 = time.perf_counter()
    comps = []
    for start in range(0, len(items), step):
        chunk = ids[start:start + step]
        # each chunk its own seed: the same draws whatever else is in the batch run
        c = cfg if cfg.seed is None else cfg.replace(seed=cfg.seed + start)
        comps += complete_batch(model, tokenizer, chunk, c)
    seconds = time.perf_counter() - t0
    group = [i // per for i in range(len(comps))]
    return Rollouts(items=[items[g] for g in group], group=group,
                    prompt_ids=[ids[g][len(ids[g]) - comps[k].prompt_tokens:] for k, g in enumerate(group)],
                    response_ids=[list(c.token_ids) for c in comps], texts=[c.text for c in comps],
                    finish_reasons=[c.finish_reason for c in comps], seconds=seconds)


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` (N, T): ``x = prompt + response[:-1]`` right-padded with ``pad_id``; ``y`` the next id, -100
    on prompt positions and padding. A response of no tokens has no target (its row is all -100)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    t = max(len(s) - 1 for s in seqs)
    x = torch.full((len(seqs), max(t, 1)), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), max(t, 1)), IGNORE, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        n = len(s) - 1
        x[i, :n] = torch.tensor(s[:-1])
        y[i, len(p) - 1:n] = torch.tensor(s[len(p):])
    return x, y


@torch.no_grad()
def response_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 16,
                   temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (N, T) of ``y`` under ``model`` (0 where ``y == -100``), in eval mode, no gradient;
    of the sampling distribution ``softmax(logits / temperature)`` (the policy the rollouts were drawn from,
    as trl scores it)."""
    from lmstack.infer.session import eval_mode

    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s:s + batch_size].to(device))
            if temperature != 1.0:
                logits = logits / temperature
            out.append(token_logps(logits, y[s:s + batch_size].to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, items: Sequence[Item], max_new_tokens: int,
                   batch_size: int = 32) -> list[str]:
    """Greedy responses (held-out evaluation): one per item."""
    from lmstack.infer.text import chat_config, complete_batch

    cfg = chat_config(tokenizer, GenerationConfig(max_new_tokens=max_new_tokens))
    ids = [prompt_ids(tokenizer, it) for it in items]
    out: list[str] = []
    for s in range(0, len(ids), batch_size):
        out += [c.text for c in complete_batch(model, tokenizer, ids[s:s + batch_size], cfg)]
    return out
