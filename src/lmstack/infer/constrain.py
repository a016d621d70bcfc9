"""Constrained decoding behind one small interface: a JSON Schema, a regex or a Lark grammar -> a token mask.

    from lmstack.infer.constrain import compile_constraint
    c = compile_constraint("json_schema", {"type": "object", ...}, tokenizer)   # one row's state
    allowed = c.allowed_mask()          # (V,) bool: the tokens that keep the output inside the language
    c.advance(token_id)                 # the token actually chosen
    c.is_done                           # an EOS id was taken (or nothing else can follow)

Two engines sit behind it, both well-kept Rust/C++ libraries: ``llguidance`` (the default: it fails closed
on every JSON Schema keyword it does not implement and reports unsatisfiable schemas) and ``xgrammar``
(selectable with ``backend="xgrammar"``; it ignores keywords it does not know, so lmstack checks the
schema against the keywords it implements first, :func:`check_xgrammar_keywords`). ``bench/structured.py``
measures both on JSONSchemaBench.

The tokenizer bridge (:func:`token_vocab`) is the one rule for what a token *is* to a constraint: the
bytes ``tokenizer.token_bytes(id)`` adds to the text, the same bytes the engine's text decoding prints,
so what the constraint accepts is exactly what the user reads. Special tokens and ids past the
tokenizer's vocabulary (a model's padded rows) are never text; the stop ids end the output and are
allowed only where the language may end.

Whitespace inside JSON is bounded: ``json_whitespace`` (default 0, compact ``,``/``:`` separators) is the
longest run allowed between JSON tokens, so a model that likes spaces cannot spend ``max_new_tokens`` on them.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.errors import ConfigError, LmstackError

KINDS = ("json_schema", "regex", "grammar")
BACKENDS = ("llguidance", "xgrammar")


class ConstraintError(LmstackError):
    """A schema / regex / grammar that cannot be compiled, or a token the constraint does not allow."""


# ---------------------------------------------------------------------------------------------------- tokenizer bridge


@dataclass(frozen=True)
class TokenVocab:
    """What a constraint engine needs to know about a tokenizer: the text bytes of every id (``b""`` for
    ids that are never text), which ids are special, and the stop ids."""

    tokens: tuple[bytes, ...]          # one per id of the model's vocabulary
    special: frozenset[int]            # special tokens and padded rows: never text
    eos: tuple[int, ...]               # stop ids: allowed only where the language may end

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def token_vocab(tokenizer: Any, vocab_size: int | None = None, eos: Sequence[int] | None = None) -> TokenVocab:
    """The bridge: ``tokenizer.token_bytes`` per id for ``vocab_size`` ids (default: the tokenizer's; a
    larger model vocabulary adds special, never-text rows), stop ids ``eos`` (default: the tokenizer's EOS)."""
    n_tok = tokenizer.vocab_size
    n = n_tok if vocab_size is None else vocab_size
    stops = tuple(dict.fromkeys(eos if eos is not None else
                                ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])))
    if not stops:
        raise ConfigError("constrained decoding needs a stop id (the tokenizer has no EOS): set eos_token_id")
    special = set(tokenizer.special_tokens.values()) | set(range(n_tok, n)) | set(stops)
    tokens = tuple(b"" if i in special or i >= n_tok else tokenizer.token_bytes(i) for i in range(n))
    # an id that adds no text (e.g. <unk> decoded as "") can never advance a text constraint
    special |= {i for i, t in enumerate(tokens) if not t}
    return TokenVocab(tokens, frozenset(i for i in special if i < n), stops)


def byte_exact_encode(tokenizer: Any, vocab: TokenVocab, text: bytes) -> list[int]:
    """Ids whose token bytes concatenate to exactly ``text``: the tokenizer's own encoding when it is (byte-level
    BPE), else greedy longest match over the vocabulary (SentencePiece adds a leading space; bytes no token
    holds, e.g. capitals for an uncased WordPiece, are skipped: no constraint can allow them anyway)."""
    try:
        ids = list(tokenizer.encode(text.decode("utf-8")))
        if b"".join(vocab.tokens[i] for i in ids if i < vocab.vocab_size) == text:
            return ids
    except (UnicodeDecodeError, LmstackError):
        pass
    table = _greedy_table(vocab)
    longest = max(len(t) for t in table) if table else 1
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            tid = table.get(text[i:i + n])
            if tid is not None:
                out.append(tid)
                i += n
                break
        else:
            i += 1
    return out


_TABLES: dict[int, tuple[TokenVocab, dict[bytes, int]]] = {}


def _greedy_table(vocab: TokenVocab) -> dict[bytes, int]:
    hit = _TABLES.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        table: dict[bytes, int] = {}
        for i, t in enumerate(vocab.tokens):
            if t and i not in vocab.special:
                table.setdefault(t, i)
        hit = _TABLES[id(vocab)] = (vocab, table)
    return hit[1]


# ---------------------------------------------------------------------------------------------------- the interface


class Constraint:
    """One output's constraint state. ``allowed_mask`` / ``fill_bitmask`` say which ids may come next;
    ``advance`` takes the id actually chosen; ``is_done`` once a stop id was taken or nothing may follow;
    ``is_accepting`` when the text so far is a complete member of the language; ``fork`` copies the state."""

    vocab_size: int
    eos: tuple[int, ...]

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed ids into ``bitmask[row]`` (int32, 32 ids per word, bit i of word w = id 32w+i)."""
        raise NotImplementedError

    def advance(self, token: int) -> None:
        raise NotImplementedError

    @property
    def is_done(self) -> bool:
        raise NotImplementedError

    @property
    def is_accepting(self) -> bool:
        raise NotImplementedError

    def fork(self) -> Constraint:
        raise NotImplementedError

    def allowed_mask(self) -> torch.Tensor:
        """(V,) bool: the ids allowed next."""
        bm = allocate_bitmask(1, self.vocab_size)
        self.fill_bitmask(bm, 0)
        return unpack_bitmask(bm, self.vocab_size)[0]


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 words -> (B, vocab_size) bool."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def compile_constraint(kind: str, spec: Any, tokenizer: Any, *, backend: str = "llguidance",
                       vocab_size: int | None = None, eos: Sequence[int] | None = None,
                       json_whitespace: int = 0) -> Constraint:
    """A fresh :class:`Constraint` for ``kind`` (``json_schema``: a dict; ``regex``: a Python-style regex the
    whole output must match; ``grammar``: a Lark grammar with a ``start`` rule) over ``tokenizer``'s ids.

    Bad input raises :class:`ConstraintError` in one line: a schema that is not valid JSON Schema (checked
    with ``jsonschema``'s meta-schema), a keyword the backend does not implement (named), an unsatisfiable
    schema, a regex or grammar that does not parse."""
    if kind not in KINDS:
        raise ConfigError(f"constraint kind {kind!r}: must be one of {', '.join(KINDS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"generation config field 'constraint_backend': must be one of "
                          f"{', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if kind == "json_schema":
        check_json_schema(spec)
    elif not isinstance(spec, str) or not spec:
        raise ConfigError(f"generation config field {kind!r}: must be a non-empty string, got {spec!r}")
    vocab = _cached_vocab(tokenizer, vocab_size, eos)
    if backend == "llguidance":
        c: Constraint = _LLGuidance.compile(kind, spec, vocab, json_whitespace,
                                            _engine_cache(tokenizer, vocab, backend), tokenizer)
    else:
        c = _XGrammar.compile(kind, spec, vocab, json_whitespace, _engine_cache(tokenizer, vocab, backend))
    # the first mask, now: a language no token can start (e.g. a $ref cycle) fails here, not mid-generation
    try:
        first = c.fork().allowed_mask()
    except ConstraintError as e:
        raise ConstraintError(f"{kind} is unsatisfiable: nothing can be generated ({_line(str(e), 120)})") from None
    if not bool(first.any()):
        raise ConstraintError(f"{kind} is unsatisfiable with this tokenizer: no token can start the output")
    return c


def check_json_schema(schema: Any) -> None:
    """A dict that is valid JSON Schema under its ``$schema`` draft (2020-12 when unset), else ConstraintError."""
    from lmstack.extras import require

    if not isinstance(schema, dict):
        raise ConstraintError(f"generation config field 'json_schema': must be a JSON object (a dict), "
                              f"got {type(schema).__name__}")
    jsonschema = require("jsonschema", "JSON Schema constrained decoding")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConstraintError(f"json_schema is not valid JSON Schema at {where}: {_line(e.message)}") from None


def _line(text: str, limit: int = 240) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit - 3] + "..."


# caches: the bridge and the engine's tokenizer object are built once per (tokenizer, vocab size, stops)
_VOCABS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
_ENGINES: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _per_tokenizer(store: weakref.WeakKeyDictionary[Any, dict], tokenizer: Any) -> dict:
    try:
        return store.setdefault(tokenizer, {})
    except TypeError:          # not weak-referenceable / hashable: no caching
        return {}


def _cached_vocab(tokenizer: Any, vocab_size: int | None, eos: Sequence[int] | None) -> TokenVocab:
    slot = _per_tokenizer(_VOCABS, tokenizer)
    key = (vocab_size, None if eos is None else tuple(eos))
    if key not in slot:
        slot[key] = token_vocab(tokenizer, vocab_size, eos)
    return slot[key]


def _engine_cache(tokenizer: Any, vocab: TokenVocab, backend: str) -> dict:
    slot = _per_tokenizer(_ENGINES, tokenizer)
    return slot.setdefault((backend, vocab.vocab_size, vocab.eos), {})


# ---------------------------------------------------------------------------------------------------- llguidance


class _LLGuidance(Constraint):
    def __init__(self, matcher: Any, vocab_size: int, eos: tuple[int, ...]):
        self.m, self.vocab_size, self.eos = matcher, vocab_size, eos
        self._eos_set = frozenset(eos)
        self._done = False

    @staticmethod
    def engine_tokenizer(vocab: TokenVocab, cache: dict, tokenizer: Any) -> Any:
        if "tok" not in cache:
            from lmstack.extras import require

            llg = require("llguidance", "constrained decoding (constraint_backend='llguidance')")
            special = sorted(vocab.special)

            class _Bridge:   # what llguidance.TokenizerWrapper reads
                eos_token_id = vocab.eos[0]
                bos_token_id = None
                tokens = list(vocab.tokens)
                special_token_ids = special

                def __call__(self, text: bytes) -> list[int]:   # llguidance tokenizes forced text with it
                    return byte_exact_encode(tokenizer, vocab, text)

            cache["tok"] = llg.LLTokenizer(llg.TokenizerWrapper(_Bridge()), n_vocab=vocab.vocab_size,
                                           eos_token=list(vocab.eos))
        return cache["tok"]

    @classmethod
    def compile(cls, kind: str, spec: Any, vocab: TokenVocab, json_whitespace: int, cache: dict,
                tokenizer: Any) -> _LLGuidance:
        import llguidance as llg

        tok = cls.engine_tokenizer(vocab, cache, tokenizer)
        if kind == "json_schema":
            ws = {"whitespace_flexible": False} if json_whitespace == 0 else \
                {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{json_whitespace}}}"}
            grammar = llg.LLMatcher.grammar_from_json_schema(
                json.dumps(spec), overrides={"item_separator": ",", "key_separator": ":", "lenient": False, **ws})
        elif kind == "regex":
            _check_python_regex(spec)
            grammar = llg.LLMatcher.grammar_from_regex(spec)
        else:
            grammar = llg.LLMatcher.grammar_from_lark(spec)
        m = llg.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(_explain(kind, m.get_error()))
        return cls(m, vocab.vocab_size, vocab.eos)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self.m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)
        if self.m.is_error():
            # e.g. "lexer error: too many expressions constructed": a resource limit of the engine (they bound
            # the per-token time) hit by a pattern that explodes combined with length bounds
            raise ConstraintError(f"the constraint engine stopped: {_line(self.m.get_error(), 160)}; simplify "
                                  f"the schema's patterns or try constraint_backend='xgrammar'")

    def advance(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise ConstraintError(f"token {token} is not allowed by the constraint here "
                                  f"({_line(self.m.get_error())})")
        if token in self._eos_set:
            self._done = True

    @property
    def is_done(self) -> bool:
        # not m.is_stopped(): that turns true once only a stop id may follow, before the row has taken it
        return self._done

    @property
    def is_accepting(self) -> bool:
        return self.m.is_accepting()

    def fork(self) -> _LLGuidance:
        twin = _LLGuidance(self.m.deep_copy(), self.vocab_size, self.eos)
        twin._done = self._done
        return twin


# ---------------------------------------------------------------------------------------------------- xgrammar

# The JSON Schema keywords xgrammar's converter implements (annotations included, which constrain nothing).
# Anything else from the JSON Schema vocabulary is refused here, because xgrammar would ignore it silently.
XGRAMMAR_KEYWORDS = frozenset({
    "$schema", "$id", "$comment", "$ref", "$defs", "definitions", "title", "description", "default", "examples",
    "deprecated", "readOnly", "writeOnly", "type", "enum", "const", "anyOf", "oneOf", "allOf",
    "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "format",
})
JSON_SCHEMA_KEYWORDS = XGRAMMAR_KEYWORDS | {
    "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary", "$recursiveRef", "$recursiveAnchor",
    "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies", "contains",
    "minContains", "maxContains", "uniqueItems", "unevaluatedProperties", "unevaluatedItems",
    "additionalItems", "contentEncoding", "contentMediaType", "contentSchema",
}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("additionalProperties", "items", "propertyNames", "not", "if", "then", "else", "contains",
                  "unevaluatedProperties", "unevaluatedItems", "additionalItems", "contentSchema")
XGRAMMAR_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "ipv4", "ipv6", "hostname",
                              "uri", "uri-reference", "uri-template", "uuid", "json-pointer",
                              "relative-json-pointer"})


def check_xgrammar_keywords(schema: Any, path: str = "") -> None:
    """Fail closed: a JSON Schema keyword xgrammar does not implement is a ConstraintError naming it."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in JSON_SCHEMA_KEYWORDS and key not in XGRAMMAR_KEYWORDS:
            raise ConstraintError(f"json_schema keyword {key!r} (at {where}) is not supported by the xgrammar "
                                  f"backend; use constraint_backend='llguidance' or drop it")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise ConstraintError(f"json_schema keyword 'allOf' with {len(value)} schemas (at {where}) is not "
                                  f"supported by the xgrammar backend; use constraint_backend='llguidance'")
        if key in ("anyOf", "oneOf", "allOf"):   # xgrammar drops assertions written beside a composition
            beside = sorted(k for k in schema if k in XGRAMMAR_KEYWORDS and k not in _ANNOTATIONS
                            and k not in ("anyOf", "oneOf", "allOf", "type"))
            if beside:
                raise ConstraintError(f"json_schema keyword {key!r} beside {', '.join(map(repr, beside))} (at {where}) "
                                      f"is not supported by the xgrammar backend (it would enforce one of them only); "
                                      f"move them into each alternative, or use constraint_backend='llguidance'")
        if key in ("enum", "const") and "type" in schema and not _values_match_type(
                value if key == "enum" and isinstance(value, list) else [value], schema["type"]):
            raise ConstraintError(f"json_schema keyword {key!r} with values outside 'type' (at {where}) is not "
                                  f"supported by the xgrammar backend (it would allow them); drop those values "
                                  f"or use constraint_backend='llguidance'")
        if key == "oneOf" and isinstance(value, list) and not _disjoint_types(value):   # xgrammar: oneOf = anyOf
            raise ConstraintError(f"json_schema keyword 'oneOf' with alternatives that may overlap (at {where}) is "
                                  f"not supported by the xgrammar backend (it would accept a value matching two); "
                                  f"use anyOf, or constraint_backend='llguidance'")
        if key == "format" and isinstance(value, str) and value not in XGRAMMAR_FORMATS:
            raise ConstraintError(f"json_schema keyword 'format' value {value!r} (at {where}) is not supported "
                                  f"by the xgrammar backend")
        if key == "pattern" and ("minLength" in schema or "maxLength" in schema):   # xgrammar drops the lengths
            raise ConstraintError(f"json_schema keyword 'pattern' combined with minLength/maxLength (at {where}) is "
                                  f"not supported by the xgrammar backend; use constraint_backend='llguidance'")
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_xgrammar_keywords(sub, f"{where}/{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_xgrammar_keywords(sub, f"{where}/{i}")
        elif key in _SUBSCHEMA_ONE:
            check_xgrammar_keywords(value, where)


def _utf8_text(token: bytes) -> bool:
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _xgrammar_and_mask(vocab: TokenVocab, json_text: bool) -> torch.Tensor:
    """(W,) int32 bitmask of the ids xgrammar may be offered: whole UTF-8 text only, and for JSON no byte < 0x20
    (stop ids kept). Why: xgrammar 0.2.9 lets a string end inside a multi-byte character (invalid UTF-8, which
    the text decoder turns into U+FFFD and a longer string than maxLength) and lets raw control characters
    into JSON strings, which JSON forbids. Characters no whole-UTF-8 token holds cannot be generated with it."""
    ok = torch.tensor([_utf8_text(t) and not (json_text and any(b < 0x20 for b in t)) for t in vocab.tokens],
                      dtype=torch.bool)
    ok[list(vocab.eos)] = True
    words = torch.zeros((vocab.vocab_size + 31) // 32 * 32, dtype=torch.int64)
    words[:vocab.vocab_size] = ok.long()
    packed = (words.view(-1, 32) << torch.arange(32, dtype=torch.int64)).sum(1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "definitions", "title", "description", "default",
                          "examples", "deprecated", "readOnly", "writeOnly"})
_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
               "array": (list,), "object": (dict,)}


def _values_match_type(values: list, types: Any) -> bool:
    names = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []

    def ok(v: Any, t: str) -> bool:
        if isinstance(v, bool) and t in ("integer", "number"):
            return False
        if t == "integer" and isinstance(v, float):
            return v.is_integer()
        return isinstance(v, _JSON_TYPES.get(t, ()))

    return all(any(ok(v, t) for t in names) for v in values)


def _disjoint_types(alternatives: list) -> bool:
    """Whether no value can match two of the ``oneOf`` alternatives, judged by their ``type`` alone (each one
    a different JSON type; integer and number overlap), or by distinct ``const`` values."""
    types = [a.get("type") if isinstance(a, dict) else None for a in alternatives]
    if all(isinstance(t, str) for t in types) and len(set(types)) == len(types):
        return not {"integer", "number"} <= set(types)
    consts = [json.dumps(a["const"], sort_keys=True) if isinstance(a, dict) and "const" in a else None
              for a in alternatives]
    return None not in consts and len(set(consts)) == len(consts)


class _XGrammar(Constraint):
    def __init__(self, compiled: Any, matcher: Any, vocab_size: int, eos: tuple[int, ...],
                 and_mask: torch.Tensor | None = None):
        self.compiled, self.m, self.vocab_size, self.eos = compiled, matcher, vocab_size, eos
        self._eos_set = frozenset(eos)
        # ANDed into every mask (_xgrammar_and_mask): whole UTF-8 tokens only; for JSON no control bytes
        # (so JSON whitespace runs are spaces only)
        self.and_mask = and_mask

    @staticmethod
    def compiler(vocab: TokenVocab, cache: dict) -> Any:
        if "compiler" not in cache:
            from lmstack.extras import require

            xgr = require("xgrammar", "constrained decoding (constraint_backend='xgrammar')")
            # xgrammar treats an empty token as special (never text): the bridge gives special ids b""
            info = xgr.TokenizerInfo(list(vocab.tokens), xgr.VocabType.RAW, vocab_size=vocab.vocab_size,
                                     stop_token_ids=list(vocab.eos))
            cache["compiler"] = xgr.GrammarCompiler(info, max_threads=1)
        return cache["compiler"]

    @classmethod
    def compile(cls, kind: str, spec: Any, vocab: TokenVocab, json_whitespace: int, cache: dict,
                tokenizer: Any = None) -> _XGrammar:
        import xgrammar as xgr

        comp = cls.compiler(vocab, cache)
        try:
            if kind == "json_schema":
                check_xgrammar_keywords(spec)
                if json_whitespace == 0:
                    g = comp.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
                else:
                    g = comp.compile_json_schema(json.dumps(spec), any_whitespace=True, separators=(",", ":"),
                                                 max_whitespace_cnt=json_whitespace)
            elif kind == "regex":
                _check_python_regex(spec)
                g = comp.compile_regex(spec)
            else:
                g = comp.compile_lark(spec)
        except ConstraintError:
            raise
        except (RuntimeError, ValueError) as e:
            raise ConstraintError(_explain(kind, re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(e)))) from None
        key = f"and_mask_{kind == 'json_schema'}"
        if key not in cache:
            cache[key] = _xgrammar_and_mask(vocab, kind == "json_schema")
        and_mask = cache[key]
        return cls(g, xgr.GrammarMatcher(g), vocab.vocab_size, vocab.eos, and_mask)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)
        if self.and_mask is not None:
            bitmask[row] &= self.and_mask

    def advance(self, token: int) -> None:
        if not self.m.accept_token(int(token)):
            raise ConstraintError(f"token {token} is not allowed by the constraint here")

    @property
    def is_done(self) -> bool:
        return self.m.is_terminated()

    @property
    def is_accepting(self) -> bool:
        return self.m.is_completed()

    def fork(self) -> _XGrammar:
        return _XGrammar(self.compiled, self.m.fork(), self.vocab_size, self.eos, self.and_mask)


# ---------------------------------------------------------------------------------------------------- errors


def _check_python_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConstraintError(f"generation config field 'regex': not a valid regex ({e})") from None


def _explain(kind: str, message: str) -> str:
    """One line naming what is wrong: the unimplemented keyword, the unsatisfiable part, the parse error."""
    msg = _line(message)
    if kind != "json_schema":
        return f"generation config field {kind!r}: cannot compile it: {msg}"
    keys = re.search(r"Unimplemented keys: \[([^\]]*)\]", msg)
    if keys:
        names = [k.strip().strip('"') for k in keys.group(1).split(",") if k.strip()]
        return (f"json_schema keyword {', '.join(map(repr, names))} is not supported by constrained decoding "
                f"(it would not be enforced); drop it or rewrite the schema")
    if "oneOf constraints are not supported" in msg:
        return ("json_schema keyword 'oneOf' with alternatives that may overlap is not supported by constrained "
                "decoding (exactly-one cannot be enforced); use anyOf if any match will do")
    fmt = re.search(r"Unknown format: (\S+)", msg)
    if fmt:
        return f"json_schema keyword 'format' value {fmt.group(1)!r} is not supported by constrained decoding"
    if "nsatisfiable" in msg:
        return f"json_schema is unsatisfiable (no JSON value matches it): {msg}"
    return f"json_schema cannot be compiled: {msg}"


# ---------------------------------------------------------------------------------------------------- the processor


def config_constraint(config: Any) -> tuple[str, Any] | None:
    """(kind, spec) of a GenerationConfig's constraint, or None."""
    for kind in KINDS:
        spec = getattr(config, kind, None)
        if spec is not None:
            return kind, spec
    return None


class ConstrainedDecoding:
    """The logits processor: ``-inf`` on every id the row's constraint does not allow next.

    It sits in the chain after the penalties and before temperature / top-k / top-p (whatever the warpers
    keep is inside the language). State advances with the ids actually appended (read from ``ids``,
    so greedy, sampling and every filter see one rule); a row whose constraint took a stop id is
    finished and left alone (its later ids are padding). ``mask_s`` collects the time each row's mask took.
    """

    def __init__(self, constraint: Constraint, prompt_len: int):
        self.template = constraint
        self.prompt_len = prompt_len
        self.rows: list[Constraint] = []
        self.seen = 0                     # generated ids already fed to the constraints
        self.mask_s: list[float] = []

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        import time

        batch = ids.shape[0]
        if not self.rows:
            self.rows = [self.template.fork() for _ in range(batch)]
        new = ids.shape[1] - self.prompt_len
        if new > self.seen:
            cols = ids[:, self.prompt_len + self.seen:self.prompt_len + new].tolist()
            for c, toks in zip(self.rows, cols):
                for t in toks:
                    if c.is_done:          # finished: what follows is padding
                        break
                    c.advance(t)
            self.seen = new
        bitmask = allocate_bitmask(batch, max(logits.shape[-1], self.template.vocab_size))
        live = []
        for r, c in enumerate(self.rows):
            if c.is_done:
                continue
            t0 = time.perf_counter()
            c.fill_bitmask(bitmask, r)
            self.mask_s.append(time.perf_counter() - t0)
            live.append(r)
        if not live:
            return logits
        allowed = unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device)
        out = logits.masked_fill(~allowed, float("-inf"))
        dead = ~torch.isfinite(out[live]).any(dim=-1)
        if bool(dead.any()):
            row = live[int(dead.nonzero()[0])]
            raise LmstackError(f"row {row}: the constraint allows only ids that another setting forbids "
                               f"(suppress_tokens, min_new_tokens, a penalty of inf); nothing can be generated")
        return out


def constraint_processor(config: Any, tokenizer: Any, prompt_len: int, vocab_size: int,
                         stop_ids: Sequence[int]) -> ConstrainedDecoding | None:
    """The processor for ``config``'s ``json_schema`` / ``regex`` / ``grammar`` (None without one), compiled
    now so that a bad schema fails at the call."""
    found = config_constraint(config)
    if found is None:
        return None
    kind, spec = found
    if tokenizer is None:
        raise ConfigError(f"{kind} needs the tokenizer: pass tokenizer= to generate (or use generate_text)")
    if not stop_ids:
        raise ConfigError(f"{kind} needs a stop id to end the output: set eos_token_id (or use a tokenizer "
                          f"with an EOS token)")
    c = compile_constraint(kind, spec, tokenizer, backend=config.constraint_backend, vocab_size=vocab_size,
                           eos=list(stop_ids), json_whitespace=config.json_whitespace)
    return ConstrainedDecoding(c, prompt_len)
