"""lmstack.prompts: prompts as code.

- :mod:`~lmstack.prompts.template`: templates from parts (instruction, context, input, output format,
  few-shot examples), sandboxed strict Jinja, token budget, chat messages for a local or remote model;
- :mod:`~lmstack.prompts.registry`: immutable versions with diffs, labels that move, rollback, SQLite
  storage, YAML export/import;
- :mod:`~lmstack.prompts.suite`: YAML test suites (assertions, repeats, Wilson intervals, regressions);
- :mod:`~lmstack.prompts.route`: rules and an embedding classifier choosing (model, prompt) per request.

See docs/prompts.md.
"""

from __future__ import annotations

from lmstack.prompts.template import PromptTemplate, RenderedPrompt

__all__ = ["PromptTemplate", "RenderedPrompt"]
