"""Test helper shared by the front-end tests: a model wrapper that emits a fixed script of token ids."""

from __future__ import annotations

import torch


class ScriptedModel(torch.nn.Module):
    """A model that emits a fixed token script (it adds +100 to the scripted id's logit at each call)."""

    def __init__(self, inner: torch.nn.Module, script: list[int]):
        super().__init__()
        self.inner, self.script, self.calls = inner, script, 0
        self.config = inner.config

    def forward(self, input_ids, *args, **kwargs):
        logits = self.inner(input_ids, *args, **kwargs).clone()
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] += 100.0
        self.calls += 1
        return logits
