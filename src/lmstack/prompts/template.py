"""Prompt templates written from parts: instruction, context, input, output format and few-shot examples.

    from lmstack.prompts import PromptTemplate
    tpl = PromptTemplate(instruction="You answer questions about {{ topic }}.",
                         context="{% for d in docs %}[{{ loop.index }}] {{ d }}\\n{% endfor %}",
                         input="{{ question }}",
                         output_format="Answer in one sentence.",
                         examples=[{"input": "What is 2+2?", "output": "4."}])
    p = tpl.render(topic="maths", docs=["..."], question="What is 3+3?")
    p.messages                     # [{"role": "system", ...}, few-shot user/assistant pairs, {"role": "user", ...}]
    p.openai_request("gpt-4o-mini")    # {"model": ..., "messages": [...]} for an OpenAI-compatible endpoint
    p.token_ids(tokenizer)         # the ids a local model sees, through its chat template
    p.check_budget(tokenizer, budget=2048, max_new_tokens=256)

Every slot is a Jinja template rendered by an ``ImmutableSandboxedEnvironment`` (a prompt is data someone
else may have written: the sandbox refuses attribute access to Python internals) with ``StrictUndefined``.
The variables a template needs are found with ``jinja2.meta.find_undeclared_variables``; rendering with a
missing variable, or with a supplied variable no slot uses (a typo, or a prompt edit that dropped a
variable the caller still passes), is an error naming the variables. A syntax error is one line with the
slot and line number.

Messages: ``system`` = instruction, then the output format (blank line between); each few-shot example is a
``user`` / ``assistant`` pair; the final ``user`` message is the context, then the input. Empty parts are
left out. :meth:`RenderedPrompt.text` is the same prompt as one string for a plain (non-chat) completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lmstack.errors import LmstackError

SLOTS = ("instruction", "context", "input", "output_format")   # the text slots, in rendering order
EXAMPLE_KEYS = ("input", "output")


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # keep_trailing_newline: a template's text is restored exactly, including its last newline
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=512)
def _compile(source: str, where: str) -> tuple[Any, frozenset[str]]:
    """The compiled template and the variables it reads from outside."""
    import jinja2
    from jinja2 import meta

    env = _env()
    try:
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmstackError(f"{where}: template syntax error at line {e.lineno}: {e.message}") from None
    return env.from_string(ast), frozenset(meta.find_undeclared_variables(ast))


@dataclass
class RenderedPrompt:
    """A rendered prompt: chat messages, ready for a local model (its chat template) or a remote endpoint."""

    messages: list[dict[str, str]]

    @property
    def text(self) -> str:
        """The prompt as one string (for a plain completion model): the parts joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages)

    def openai_messages(self) -> list[dict[str, str]]:
        """OpenAI-style chat messages (``[{"role", "content"}]``), new dicts."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def openai_request(self, model: str, **params: Any) -> dict[str, Any]:
        """The body of a ``/chat/completions`` request (``params``: max_tokens, temperature, ...)."""
        return {"model": model, "messages": self.openai_messages(), **params}

    def token_ids(self, tokenizer: Any) -> list[int]:
        """The ids a local model sees: the messages through the tokenizer's chat template, up to the
        assistant's turn (:func:`lmstack.infer.text.chat_prompt_ids`, the rule every chat front-end uses)."""
        from lmstack.infer.text import chat_prompt_ids  # torch: only when a token count is asked for

        return chat_prompt_ids(tokenizer, self.messages)

    def count_tokens(self, tokenizer: Any, chat: bool = True) -> int:
        """Prompt tokens: through the chat template (``chat=True``, a local chat model), or of :attr:`text`
        encoded plainly (``chat=False``: a completion model, or an estimate for a remote model)."""
        return len(self.token_ids(tokenizer)) if chat else len(tokenizer.encode(self.text))

    def check_budget(self, tokenizer: Any, budget: int, max_new_tokens: int = 0, chat: bool = True) -> int:
        """The prompt's token count; raises when it and ``max_new_tokens`` do not fit in ``budget`` (the
        context window), before anything is sent (a prompt cut from the left loses its instruction)."""
        if budget < 1:
            raise LmstackError(f"context budget must be >= 1 token, got {budget}")
        n = self.count_tokens(tokenizer, chat=chat)
        if n + max_new_tokens > budget:
            raise LmstackError(f"prompt is {n} tokens + max_new_tokens {max_new_tokens} = {n + max_new_tokens}, "
                               f"over the context budget of {budget}; shorten the context or lower max_new_tokens")
        return n


@dataclass
class PromptTemplate:
    """The slots of a prompt; each is a Jinja template (sandboxed, strict). See the module docstring."""

    instruction: str = ""
    context: str = ""
    input: str = ""
    output_format: str = ""
    examples: list[dict[str, str]] = field(default_factory=list)   # few-shot: {"input", "output"} templates
    name: str = "prompt"   # for error messages

    def __post_init__(self) -> None:
        for slot in SLOTS:
            if not isinstance(getattr(self, slot), str):
                raise LmstackError(f"prompt {self.name!r} field {slot!r}: expected a string, "
                                   f"got {type(getattr(self, slot)).__name__}")
        if not isinstance(self.examples, list):
            raise LmstackError(f"prompt {self.name!r} field 'examples': expected a list of {{input, output}}")
        for k, ex in enumerate(self.examples):
            if not isinstance(ex, Mapping) or set(ex) != set(EXAMPLE_KEYS) or \
                    not all(isinstance(ex[key], str) for key in EXAMPLE_KEYS):
                raise LmstackError(f"prompt {self.name!r} examples[{k}]: expected exactly the string keys "
                                   f"'input' and 'output'")
        if not any(getattr(self, s) for s in SLOTS) and not self.examples:
            raise LmstackError(f"prompt {self.name!r}: every slot is empty; give at least an instruction or input")
        self.variables()   # compile now: a syntax error is reported where the template is made

    # -- serialisation (the registry stores exactly these fields)
    def fields(self) -> dict[str, Any]:
        """The template as plain data, in a fixed key order (what the registry stores and exports)."""
        return {**{s: getattr(self, s) for s in SLOTS},
                "examples": [{k: ex[k] for k in EXAMPLE_KEYS} for ex in self.examples]}

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], name: str = "prompt") -> PromptTemplate:
        """A template from :meth:`fields` data; an unknown key is an error naming it."""
        if not isinstance(data, Mapping):
            raise LmstackError(f"prompt {name!r}: expected a mapping of template fields "
                               f"({', '.join((*SLOTS, 'examples'))})")
        unknown = sorted(set(data) - {*SLOTS, "examples"})
        if unknown:
            raise LmstackError(f"prompt {name!r}: unknown template field(s) {', '.join(unknown)}; "
                               f"fields: {', '.join((*SLOTS, 'examples'))}")
        values = dict(data)
        if isinstance(values.get("examples"), list):   # copies: the template never aliases the caller's dicts
            values["examples"] = [dict(e) if isinstance(e, Mapping) else e for e in values["examples"]]
        return cls(**values, name=name)

    def _parts(self) -> list[tuple[str, str]]:
        parts = [(slot, getattr(self, slot)) for slot in SLOTS]
        for k, ex in enumerate(self.examples):
            parts += [(f"examples[{k}].{key}", ex[key]) for key in EXAMPLE_KEYS]
        return parts

    def variables(self) -> set[str]:
        """The variables the template reads (every slot and example)."""
        out: set[str] = set()
        for where, source in self._parts():
            out |= _compile(source, f"prompt {self.name!r} field {where!r}")[1]
        return out

    def render(self, variables: Mapping[str, Any] | None = None, /, **kwargs: Any) -> RenderedPrompt:
        """Render every slot with exactly the template's variables (missing or unused -> LmstackError)."""
        import jinja2

        values = {**(variables or {}), **kwargs}
        needed = self.variables()
        missing = sorted(needed - set(values))
        if missing:
            raise LmstackError(f"prompt {self.name!r}: missing variable(s) {', '.join(missing)}; "
                               f"the template needs {', '.join(sorted(needed))}")
        unused = sorted(set(values) - needed)
        if unused:
            raise LmstackError(f"prompt {self.name!r}: variable(s) {', '.join(unused)} not used by the template; "
                               f"it uses {', '.join(sorted(needed)) or '(none)'}")
        out: dict[str, str] = {}
        for where, source in self._parts():
            template = _compile(source, f"prompt {self.name!r} field {where!r}")[0]
            try:
                out[where] = template.render(values)
            except jinja2.UndefinedError as e:   # e.g. {{ doc.title }} on a doc without a title
                raise LmstackError(f"prompt {self.name!r} field {where!r}: {e.message}") from None
            except jinja2.exceptions.SecurityError as e:
                raise LmstackError(f"prompt {self.name!r} field {where!r}: refused by the sandbox: {e}") from None
            except jinja2.TemplateError as e:
                raise LmstackError(f"prompt {self.name!r} field {where!r}: {e}") from None
        return RenderedPrompt(_messages(out, len(self.examples)))


def _messages(parts: Mapping[str, str], n_examples: int) -> list[dict[str, str]]:
    def join(*texts: str) -> str:
        return "\n\n".join(t for t in texts if t)

    messages = []
    system = join(parts["instruction"], parts["output_format"])
    if system:
        messages.append({"role": "system", "content": system})
    for k in range(n_examples):
        messages.append({"role": "user", "content": parts[f"examples[{k}].input"]})
        messages.append({"role": "assistant", "content": parts[f"examples[{k}].output"]})
    user = join(parts["context"], parts["input"])
    if user:
        messages.append({"role": "user", "content": user})
    return messages


def as_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A plain string as one user message; messages as they are (copied)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
