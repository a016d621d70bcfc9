"""Alignment: reward models, offline preference methods (DPO/IPO, KTO) and online RL (PPO, GRPO).

Every method is a standalone loss function (formula and paper in its docstring) plus a small module that
feeds it to the one trainer through its :class:`lmstack.train.trainer.Task` hook; online methods draw their
rollouts from the one engine in :mod:`lmstack.infer`.

- ``reward.py``: a scalar head on a decoder, the Bradley-Terry loss, ``score(prompts, responses)``;
- ``dpo.py`` (DPO sigmoid / IPO / label-smoothed), ``kto.py``: offline preference losses and their tasks;
- ``ppo.py`` (clipped policy loss, value head, GAE), ``grpo.py`` (group-normalised advantages);
- ``rewards.py``: verifiable rewards (numeric answers, formats, code that passes tests) and their sums;
- ``data.py``: preference, unpaired and prompt-only rows, rendered with the chat template.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dpo_loss", "grpo_loss", "kto_loss", "ppo_loss", "bradley_terry_loss", "score", "speedrun_dpo",
           "load_reward_model", "add_scalar_head", "simpo_loss", "orpo_odds_ratio"]

# torch loads only when a name is used
_LAZY = {"dpo_loss": "dpo", "kto_loss": "kto", "grpo_loss": "grpo", "ppo_loss": "ppo",
         "bradley_terry_loss": "reward", "score": "reward", "load_reward_model": "reward",
         "add_scalar_head": "reward", "speedrun_dpo": "dpo", "simpo_loss": "dpo", "orpo_odds_ratio": "dpo"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lmstack.align.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.align' has no attribute {name!r}")
