"""Hugging Face chat templates: the Jinja ``chat_template`` of a model folder, rendered as transformers does.

    from lmstack.tokenizer import load_chat_template
    tpl = load_chat_template("models/Qwen2.5-Instruct")          # a folder, tokenizer_config.json or .jinja file
    text = tpl.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Where the template comes from (first found): ``chat_template.jinja`` in the folder, else the
``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` of which
``"default"`` is used, ``"tool_use"`` when tools are given and the list has one).

Rendering follows ``transformers.utils.chat_template_utils`` (checked against transformers 5.24 in
tests/test_tokenizer_template.py): an ``ImmutableSandboxedEnvironment`` (templates are untrusted code) with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not
escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``. The variables
are ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special tokens of the config
(``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``, ``mask_token``; an
``AddedToken`` dict counts as its ``content``) and any extra keyword argument (which wins over a token of the
same name, e.g. ``date_string`` for Llama 3). A template that calls ``raise_exception`` (or fails otherwise)
raises :class:`lmstack.errors.LmstackError` with the template's message on one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmstack.errors import DataError, LmstackError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def token_content(value: Any) -> str | None:
    """A special token as written in a config: a string, or an AddedToken dict (its ``content``)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json_config(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; not UTF-8, not JSON or not an object -> DataError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); is the file truncated?") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def special_tokens_of(folder: Path, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The named special tokens of a tokenizer folder: ``tokenizer_config.json`` first, then
    ``special_tokens_map.json`` for names the config does not set."""
    config = config if config is not None else (
        read_json_config(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {})
    out: dict[str, str] = {}
    extra = read_json_config(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() \
        else {}
    for name in SPECIAL_TOKEN_NAMES:
        value = token_content(config.get(name)) if name in config else token_content(extra.get(name))
        if value is not None:
            out[name] = value
    return out


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes <, >, & for HTML; chat templates want the JSON as is.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    class SafeNamespace(jinja2.utils.Namespace):
        # No underscore attributes: they are the way out of a sandbox into CPython internals.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: underscore names are refused")

    class SafeDict:
        # ``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the class itself.
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class Generation(jinja2.ext.Extension):
        # ``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' loss masks;
        # here it renders its body unchanged (the tags still take part in trim_blocks/lstrip_blocks).
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=SafeDict(),
                       namespace=SafeNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmstackError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only, so the template never sees (or mutates) the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    return str(value)


@dataclass
class ChatTemplate:
    """A Hugging Face chat template with the special tokens of its folder."""

    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    named: dict[str, str] = field(default_factory=dict)   # other named templates ("tool_use", ...)
    origin: str = "chat template"

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The conversation as text, identical to transformers' ``apply_chat_template(..., tokenize=False)``."""
        import jinja2

        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise LmstackError("chat messages must be a list of {'role', 'content'} dicts")
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise LmstackError(f"chat message {k}: expected a dict with 'role' and 'content'")
        source = self.named.get("tool_use", self.source) if tools is not None else self.source
        template = _compile(source)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return template.render(messages=_plain(list(messages)), tools=_plain(tools),
                                   documents=_plain(variables.pop("documents", None)),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise LmstackError(f"{self.origin}: {msg}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
            raise LmstackError(f"{self.origin}: rendering failed ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})") from None


def _pick(value: Any, origin: str) -> tuple[str, dict[str, str]]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named = {}
        for item in value:
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) \
                    or not isinstance(item.get("template"), str):
                raise DataError(f"{origin}: chat_template list items must be {{'name', 'template'}} strings")
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise DataError(f"{origin}: chat_template has named templates {sorted(named)} but no 'default'")
        return named["default"], named
    raise DataError(f"{origin}: chat_template must be a string or a list of named templates")


def find_chat_template(path: str | os.PathLike) -> ChatTemplate | None:
    """The chat template of a folder (or a ``tokenizer_config.json``/``.jinja`` file), or None if it has none."""
    p = Path(path)
    if p.is_file():
        folder = p.parent
        if p.suffix == ".jinja":
            jinja_file, config_file = p, folder / "tokenizer_config.json"
        else:
            jinja_file, config_file = None, p
    elif p.is_dir():
        folder, jinja_file, config_file = p, p / "chat_template.jinja", p / "tokenizer_config.json"
    else:
        raise DataError(f"{p}: no such folder or file for a chat template")
    config = read_json_config(config_file) if config_file.is_file() else {}
    tokens = special_tokens_of(folder, config) if config_file.is_file() else {}
    if jinja_file is not None and jinja_file.is_file():
        try:
            source = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{jinja_file}: not UTF-8 text") from None
        return ChatTemplate(source, tokens, {}, origin=f"chat template {jinja_file}")
    if "chat_template" in config and config["chat_template"] is not None:
        source, named = _pick(config["chat_template"], str(config_file))
        return ChatTemplate(source, tokens, named, origin=f"chat template of {config_file}")
    return None


def load_chat_template(path: str | os.PathLike) -> ChatTemplate:
    """The Hugging Face chat template of a model/tokenizer folder, ``tokenizer_config.json`` or ``.jinja`` file."""
    tpl = find_chat_template(path)
    if tpl is None:
        raise DataError(f"{path}: no chat template (expected chat_template.jinja or a 'chat_template' field in "
                        f"tokenizer_config.json)")
    return tpl
