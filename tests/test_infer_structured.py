"""Structured output: JSON Schema / regex / Lark-grammar constrained decoding (lmstack.infer.constrain) through
generate / complete / Batch, both engines (llguidance, xgrammar), the tokenizer bridge, the whitespace bound,
fail-closed errors, and the validate / repair loop for remote models (lmstack.infer.structured)."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer import GenerationConfig, generate_result
from lmstack.infer.batch import Batch
from lmstack.infer.constrain import ConstraintError, allocate_bitmask, compile_constraint, token_vocab, unpack_bitmask
from lmstack.infer.structured import StructuredOutputError, generate_json, parse_completion, validate_json
from lmstack.infer.text import complete, complete_batch, generate_text
from lmstack.model import build_model, preset
from lmstack.tokenizer import train_bpe

BACKENDS = ["llguidance"] + (["xgrammar"] if __import__("importlib").util.find_spec("xgrammar") else [])
CORPUS = ['{"name": "cat", "age": 3, "tags": ["a", "b"], "ok": true, "x": null, "n": -1.5}\n' * 3
          + "the cat sat on the mat. once upon a time there was a dog.\n" * 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models step faster on one thread, and the per-step mask is single-threaded anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=320)


def tiny_model(vocab: int, seed: int = 0, bias: dict[int, float] | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(preset("tiny", vocab_size=vocab, d_model=32, n_layer=2, n_head=4, max_seq_len=256,
                           tie_embeddings=False, lm_head_bias=bias is not None)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3)
        for i, b in (bias or {}).items():
            m.lm_head_bias[i] = b
    return m


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


# ---------------------------------------------------------------------------------------------------- random schemas

PATTERNS = ["^[a-z]{1,4}$", "^[0-9]{2}-[0-9]{2}$", "^(yes|no)$", "^[A-Z][a-z]{0,3}$", "^x+$"]


def random_schema(rng: random.Random, depth: int = 0, defs: dict | None = None) -> dict:
    """A small satisfiable schema; strings, numbers and arrays are bounded so a random model can finish."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const"]
    if depth < 2:
        kinds += ["array", "object", "object", "anyOf", "oneOf", "ref"]
    kind = rng.choice(kinds)
    if kind == "string":
        s: dict = {"type": "string"}
        if rng.random() < 0.35:
            s["pattern"] = rng.choice(PATTERNS)
            if s["pattern"] == "^x+$":
                s["maxLength"] = 3
        else:
            lo = rng.randint(0, 2)
            s.update(minLength=lo, maxLength=lo + rng.randint(0, 4))
        return s
    if kind == "integer":
        lo = rng.randint(-20, 20)
        s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
        if rng.random() < 0.3:
            s["exclusiveMinimum"] = s.pop("minimum") - 1
        return s
    if kind == "number":
        lo = rng.randint(-5, 5)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 50)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        pool = ["red", "green", "a b", 1, 2, -3, None, True, "x\"y"]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 42, False, None, [1, 2], {"k": "v"}])}
    if kind == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": random_schema(rng, depth + 1, defs), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    if kind == "object":
        names = rng.sample(["id", "name", "age", "tags", "ok", "kind", "v"], rng.randint(1, 3))
        props = {n: random_schema(rng, depth + 1, defs) for n in names}
        s = {"type": "object", "properties": props,
             "required": [n for n in names if rng.random() < 0.6]}
        s["additionalProperties"] = False
        return s
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1, defs) for _ in range(2)]}
    if kind == "oneOf":   # alternatives of different types, so exactly one matches
        alts = rng.sample([{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0, "maximum": 99},
                           {"type": "boolean"}, {"type": "null"},
                           {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}], 2)
        return {"oneOf": alts}
    # ref
    if defs is None:
        return random_schema(rng, depth, defs)
    name = f"d{len(defs)}"
    defs[name] = {}                      # reserved before the recursion names its own definitions
    defs[name] = random_schema(rng, depth + 1, defs)
    return {"$ref": f"#/$defs/{name}"}


def random_schemas(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        defs: dict = {}
        s = random_schema(rng, 0, defs)
        if defs:
            s = {**s, "$defs": defs} if "$ref" not in s else {"allOf": [s], "$defs": defs}
        out.append(s)
    return out


def test_random_schemas_are_valid_and_cover_the_keywords():
    schemas = random_schemas(200, seed=0)
    text = json.dumps(schemas)
    for kw in ("properties", "items", "enum", "const", "minimum", "exclusiveMinimum", "minLength", "maxLength",
               "pattern", "anyOf", "oneOf", "$ref", "$defs", "required", "additionalProperties"):
        assert f'"{kw}"' in text, kw
    for s in schemas:
        jsonschema.Draft202012Validator.check_schema(s)


def _run_schemas(model, tok, schemas, backend, max_new=48, n=2):
    finished = total = refused = 0
    for i, schema in enumerate(schemas):
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=0.95, seed=i,
                               num_return_sequences=n, json_schema=schema, constraint_backend=backend)
        try:
            outs = complete_batch(model, tok, ["{"], cfg)
        except ConstraintError as e:      # fails closed: a keyword combination this engine would not enforce
            assert backend == "xgrammar" and "not supported by the xgrammar backend" in str(e), e
            refused += 1
            continue
        for c in outs:
            total += 1
            if c.finish_reason == "stop":
                finished += 1
                value = json.loads(c.text)   # every finished output parses ...
                jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)   # ... and validates
            else:
                with pytest.raises(StructuredOutputError, match="max_new_tokens"):
                    parse_completion(c, schema)
    assert refused <= 0.2 * len(schemas), refused
    return finished, total


@pytest.mark.parametrize("backend", BACKENDS)
def test_200_random_schemas_every_finished_output_validates(model, tok, backend):
    schemas = random_schemas(200 if backend == "llguidance" else 60, seed=1)
    finished, total = _run_schemas(model, tok, schemas, backend)
    assert finished >= 0.6 * total, (finished, total)   # the bounds let most finish: the check is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_1000_random_schemas_longer_outputs(model, tok, backend):
    finished, total = _run_schemas(model, tok, random_schemas(1000, seed=2), backend, max_new=128, n=4)
    assert finished >= 0.8 * total


# ---------------------------------------------------------------------------------------------------- engine rules


def _replay_greedy(model, tok, prompt_ids, out_ids, schema, backend):
    """Every greedy constrained id is the argmax of the raw logits over the ids the constraint allows."""
    c = compile_constraint("json_schema", schema, tok, backend=backend, vocab_size=model.config.vocab_size,
                           eos=[tok.eos_id])
    seq = list(prompt_ids)
    for t in out_ids:
        logits = model(torch.tensor([seq]))[0, -1].float()
        allowed = c.allowed_mask()
        assert allowed[t], t
        assert t == int(logits.masked_fill(~allowed, float("-inf")).argmax())
        c.advance(t)
        seq.append(t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_top_k_1_pick_the_best_allowed_token(model, tok, backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 50},
                                               "b": {"enum": ["cat", "dog"]}}, "required": ["a", "b"],
              "additionalProperties": False}
    prompt = tok.encode("the cat")
    greedy = complete(model, tok, prompt, GenerationConfig(max_new_tokens=40, json_schema=schema,
                                                           constraint_backend=backend))
    assert greedy.finish_reason == "stop"
    validate_json(greedy.text, schema, extract=False)
    with torch.no_grad():
        _replay_greedy(model, tok, prompt, greedy.token_ids, schema, backend)
    # the mask comes before top-k: top_k=1 sampling is greedy over the allowed ids (after it, it would fail)
    k1 = complete(model, tok, prompt, GenerationConfig(max_new_tokens=40, json_schema=schema, do_sample=True,
                                                       top_k=1, temperature=0.7, seed=3, constraint_backend=backend))
    assert k1.token_ids == greedy.token_ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warp", [dict(top_k=5), dict(top_p=0.5), dict(temperature=2.5), dict(min_p=0.2),
                                  dict(repetition_penalty=1.3, top_k=20, top_p=0.9, temperature=0.8)])
def test_composes_with_the_sampling_chain(model, tok, backend, warp):
    schema = {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}
    cfg = GenerationConfig(max_new_tokens=40, do_sample=True, seed=0, num_return_sequences=4, json_schema=schema,
                           constraint_backend=backend, **warp)
    outs = complete_batch(model, tok, ["the"], cfg)
    assert any(c.finish_reason == "stop" for c in outs)
    for c in outs:
        if c.finish_reason == "stop":
            validate_json(c.text, schema, extract=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_rows_finish_at_different_steps(model, tok, backend):
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 8}}, "required": ["k"],
              "additionalProperties": False}
    cfg = GenerationConfig(max_new_tokens=60, do_sample=True, seed=5, json_schema=schema, constraint_backend=backend)
    prompts = ["the cat sat on the mat", "once", "a dog", "there was a time", "the", "mat"]
    outs = complete_batch(model, tok, prompts, cfg)
    assert all(c.finish_reason == "stop" for c in outs)
    assert len({c.n_tokens for c in outs}) > 1          # different lengths: finished rows wait as padding
    for c in outs:
        validate_json(c.text, schema, extract=False)
    # each row alone gives the same text as in the batch when greedy
    g = cfg.replace(do_sample=False)
    batch = [c.text for c in complete_batch(model, tok, prompts[:3], g)]
    assert batch == [complete(model, tok, p, g).text for p in prompts[:3]]


def test_generate_text_and_ids_level_generate_honour_the_schema(model, tok):
    schema = {"enum": ["alpha", "beta", 7]}
    cfg = GenerationConfig(max_new_tokens=10, json_schema=schema)
    assert json.loads(generate_text(model, tok, "the", cfg)) in schema["enum"]
    res = generate_result(model, [tok.encode("the")], cfg.replace(eos_token_id=tok.eos_id), tokenizer=tok)
    text = b"".join(tok.token_bytes(t) for t in res.new_tokens(0) if t != tok.eos_id).decode()
    assert json.loads(text) in schema["enum"] and res.finish_reasons == ["stop"]
    assert len(res.stats["constraint_mask_s"]) == res.num_generated[0]   # one mask per step, timed
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        generate_result(model, [tok.encode("the")], cfg.replace(eos_token_id=tok.eos_id))


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_batch_rows_each_with_their_own_constraint(model, tok, backend):
    batch = Batch(model, slots=3, tokenizer=tok)
    schemas = [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "yy"]},
               {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]
    ids = [batch.add(tok.encode("the"), GenerationConfig(max_new_tokens=20, json_schema=s, eos_token_id=tok.eos_id,
                                                         constraint_backend=backend, do_sample=True, seed=i))
           for i, s in enumerate(schemas)]
    while batch.running:
        batch.step()
    for i, s in zip(ids, schemas):
        seq = batch.retire(i)
        assert seq.finish_reason == "stop"
        text = b"".join(tok.token_bytes(t) for t in seq.tokens[:-1]).decode()
        validate_json(text, s, extract=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_tokens_is_length_never_valid(model, tok, backend):
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 20, "maxLength": 30}},
              "required": ["name"]}
    c = complete(model, tok, "the", GenerationConfig(max_new_tokens=4, json_schema=schema, constraint_backend=backend))
    assert c.finish_reason == "length" and c.n_tokens == 4
    with pytest.raises(StructuredOutputError, match="before the JSON was complete"):
        parse_completion(c, schema)


# ---------------------------------------------------------------------------------------------------- whitespace bound


def _outside_strings(text: str) -> str:
    """The JSON text with string literals removed."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_that_loves_whitespace_still_finishes(tok, backend):
    ws = [i for i in range(tok.vocab_size) if tok.token_bytes(i) and not tok.token_bytes(i).strip()]
    assert ws   # spaces, newlines, their runs
    lover = tiny_model(tok.vocab_size, seed=1, bias={i: 30.0 for i in ws})
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}, "maxItems": 3},
                                               "b": {"type": "boolean"}}, "required": ["a", "b"],
              "additionalProperties": False}
    # unconstrained, it only emits whitespace
    free = complete(lover, tok, "the", GenerationConfig(max_new_tokens=30))
    assert free.finish_reason == "length" and not free.text.strip()
    for bound in (0, 2):
        cfg = GenerationConfig(max_new_tokens=80, json_schema=schema, json_whitespace=bound, constraint_backend=backend)
        c = complete(lover, tok, "the", cfg)
        assert c.finish_reason == "stop", (bound, c.text)
        validate_json(c.text, schema, extract=False)
        runs = [len(m) for m in re.findall(r"\s+", _outside_strings(c.text))]
        assert max(runs, default=0) <= bound, (bound, c.text)
        if bound:
            assert runs   # the model did use the whitespace it was allowed


# ---------------------------------------------------------------------------------------------------- regex / grammar


def _byte_ids(tok) -> dict[int, int]:
    """byte value -> a token id whose text is exactly that byte."""
    out = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if len(b) == 1 and i not in tok.special_tokens.values():
            out.setdefault(b[0], i)
    return out


def _accepts(c, text: str, byte_ids: dict[int, int], eos: int) -> bool:
    for ch in text.encode():
        t = byte_ids[ch]
        if not c.allowed_mask()[t]:
            return False
        c.advance(t)
    return bool(c.allowed_mask()[eos])


def _strings(alphabet: str, max_len: int):
    for n in range(max_len + 1):
        for s in itertools.product(alphabet, repeat=n):
            yield "".join(s)


REGEXES = [("a(b|c)*d?", "abcd", 5), ("[0-9]{2,3}", "019a", 4), ("(ab)+|ba", "ab", 6), ("x?y?z?", "xyz", 4),
           ("-?(0|[1-9][0-9]*)", "-019", 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,alphabet,max_len", REGEXES)
def test_regex_accepts_exactly_its_language(tok, backend, pattern, alphabet, max_len):
    byte_ids = _byte_ids(tok)
    c0 = compile_constraint("regex", pattern, tok, backend=backend)
    n = 0
    for s in _strings(alphabet, max_len):
        got = _accepts(c0.fork(), s, byte_ids, tok.eos_id)
        assert got == bool(re.fullmatch(pattern, s)), (pattern, s, got)
        n += got
    assert n > 0


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def _sum_expr(s: str) -> bool:   # term ("+" term)*, term = "a" | "b" | "(" expr ")"
    def expr(i):
        i = term(i)
        while i is not None and i < len(s) and s[i] == "+":
            i = term(i + 1)
        return i

    def term(i):
        if i < len(s) and s[i] in "ab":
            return i + 1
        if i < len(s) and s[i] == "(":
            j = expr(i + 1)
            return j + 1 if j is not None and j < len(s) and s[j] == ")" else None
        return None

    return expr(0) == len(s)


GRAMMARS = [
    ('start: ("(" start ")")*', "()", 8, _balanced),
    ('start: ("a" start "b")?', "ab", 8, lambda s: s == "a" * (len(s) // 2) + "b" * (len(s) // 2)),
    ('start: expr\nexpr: term ("+" term)*\nterm: "a" | "b" | "(" expr ")"', "ab+()", 5, _sum_expr),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grammar,alphabet,max_len,member", GRAMMARS)
def test_grammar_accepts_exactly_its_language(tok, backend, grammar, alphabet, max_len, member):
    byte_ids = _byte_ids(tok)
    c0 = compile_constraint("grammar", grammar, tok, backend=backend)
    n = 0
    for s in _strings(alphabet, max_len):
        got = _accepts(c0.fork(), s, byte_ids, tok.eos_id)
        assert got == member(s), (grammar, s, got)
        n += got
    assert n > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_and_grammar_generation_end_in_their_language(model, tok, backend):
    cfg = GenerationConfig(max_new_tokens=30, do_sample=True, seed=0, num_return_sequences=6,
                           constraint_backend=backend)
    for c in complete_batch(model, tok, ["the"], cfg.replace(regex=r"(cat|dog)( (cat|dog)){0,3}")):
        assert c.finish_reason == "stop" and re.fullmatch(r"(cat|dog)( (cat|dog)){0,3}", c.text), c.text
    for c in complete_batch(model, tok, ["the"], cfg.replace(grammar='start: "[" ("a" | "b")* "]"')):
        if c.finish_reason == "stop":
            assert re.fullmatch(r"\[[ab]*\]", c.text), c.text


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schema,keyword", [
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
    ({"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True, "items": {"type": "integer"}}}},
     "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
])
def test_unsupported_keyword_fails_closed_naming_it(tok, backend, schema, keyword):
    try:
        compile_constraint("json_schema", schema, tok, backend=backend)
    except ConstraintError as e:
        assert keyword in str(e) and "\n" not in str(e)
    else:
        pytest.skip(f"{backend} implements {keyword}")   # enforced, so not an error


@pytest.mark.skipif("xgrammar" not in BACKENDS, reason="xgrammar not installed")
@pytest.mark.parametrize("schema,named", [
    # JSONSchemaBench cases where xgrammar 0.2.9 alone accepted invalid output (bench/structured.py)
    ({"type": "string", "enum": ["1", "2-two", None]}, "'enum' with values outside 'type'"),
    ({"type": "object", "required": ["alg"], "anyOf": [{"properties": {"alg": {"enum": ["RS256"]}}}]},
     "'anyOf' beside 'required'"),
    ({"oneOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"b": {"type": "string"}}}]},
     "'oneOf' with alternatives that may overlap"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "'pattern' combined with minLength/maxLength"),
])
def test_xgrammar_refuses_what_it_would_not_enforce(tok, schema, named):
    with pytest.raises(ConstraintError, match=re.escape(named)):
        compile_constraint("json_schema", schema, tok, backend="xgrammar")
    if "oneOf" not in schema:        # llguidance enforces these (and refuses the overlapping oneOf too)
        compile_constraint("json_schema", schema, tok)


def test_llguidance_rejects_unknown_format_and_xgrammar_too(tok):
    for backend in BACKENDS:
        with pytest.raises(ConstraintError, match="'format' value 'colour'"):
            compile_constraint("json_schema", {"type": "string", "format": "colour"}, tok, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_and_unsatisfiable_schemas_are_one_line_errors(tok, backend):
    with pytest.raises(ConstraintError, match=r"not valid JSON Schema at type: 'strng' is not valid"):
        compile_constraint("json_schema", {"type": "strng"}, tok, backend=backend)
    with pytest.raises(ConstraintError, match="not valid JSON Schema at properties/a/minLength"):
        compile_constraint("json_schema", {"properties": {"a": {"minLength": -1}}}, tok, backend=backend)
    with pytest.raises(ConstraintError) as e:
        compile_constraint("json_schema", {"type": "integer", "minimum": 5, "maximum": 1}, tok, backend=backend)
    assert "\n" not in str(e.value) and ("unsatisfiable" in str(e.value) or "minimum" in str(e.value))
    if backend == "llguidance":
        with pytest.raises(ConstraintError, match="unsatisfiable"):
            compile_constraint("json_schema", {"type": "object", "properties": {}, "required": ["b"],
                                               "additionalProperties": False}, tok)
    with pytest.raises(ConstraintError, match="'regex': not a valid regex"):
        compile_constraint("regex", "a(b", tok, backend=backend)
    with pytest.raises(ConstraintError, match="'grammar': cannot compile"):
        compile_constraint("grammar", "start: (", tok, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ref_cycle_no_token_can_start_fails_at_compile_time(tok, backend):
    schema = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    with pytest.raises(ConstraintError, match="unsatisfiable|cannot be compiled"):
        compile_constraint("json_schema", schema, tok, backend=backend)


def test_streamed_text_equals_the_completion(model, tok):
    from lmstack.infer.text import stream_complete

    cfg = GenerationConfig(max_new_tokens=40, do_sample=True, seed=2,
                           json_schema={"type": "array", "items": {"enum": ["cat", "dog", 1]}, "maxItems": 4})
    streamed = "".join(stream_complete(model, tok, "the", cfg))
    assert streamed == complete(model, tok, "the", cfg).text
    validate_json(streamed, cfg.json_schema, extract=False)


def test_config_rules_name_the_field():
    with pytest.raises(ConfigError, match="'regex': set at most one"):
        GenerationConfig(json_schema={"type": "string"}, regex="a")
    with pytest.raises(ConfigError, match="'json_schema': .*not beam search"):
        GenerationConfig(json_schema={"type": "string"}, num_beams=2)
    with pytest.raises(ConfigError, match="'grammar': .*speculative"):
        GenerationConfig(grammar="start: \"a\"", prompt_lookup_num_tokens=2)
    with pytest.raises(ConfigError, match="'regex': the constraint decides"):
        GenerationConfig(regex="a+", stop_strings=["x"])
    with pytest.raises(ConfigError, match="'constraint_backend'"):
        GenerationConfig.from_dict({"regex": "a", "constraint_backend": "outlines"})
    with pytest.raises(ConfigError, match="'json_whitespace'"):
        GenerationConfig(json_whitespace=-1)
    cfg = GenerationConfig(json_schema={"type": "object", "properties": {"a": {"const": 1}}})
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg


def test_speculative_with_a_draft_model_is_refused(model, tok):
    with pytest.raises(ConfigError, match="speculative"):
        generate_result(model, [tok.encode("the")], GenerationConfig(regex="a", eos_token_id=tok.eos_id),
                        tokenizer=tok, draft_model=model)


def test_cli_generate_json_schema(tmp_path, tok, model, capsys):
    from lmstack.cli import LAYER_CLIS, main
    from lmstack.model import save

    if "lmstack.infer.cli" not in LAYER_CLIS:
        LAYER_CLIS.append("lmstack.infer.cli")
    run = tmp_path / "run"
    save(model, run)
    tok.save(run)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert main(["generate", str(run), "--prompt", "the", "--json-schema", str(tmp_path / "s.json"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["finish_reason"] == "stop"
    validate_json(rec["completion"], schema, extract=False)
    assert main(["generate", str(run), "--prompt", "the", "--regex", "(ab)+"]) == 0
    assert re.fullmatch(r"the(ab)+", capsys.readouterr().out.strip().splitlines()[0])
    (tmp_path / "g.lark").write_text('start: "<" ("x" | "y") ("x" | "y")? ">"')
    assert main(["generate", str(run), "--prompt", "the", "--grammar", str(tmp_path / "g.lark"),
                 "--constraint_backend", "xgrammar" if "xgrammar" in BACKENDS else "llguidance"]) == 0
    assert re.fullmatch(r"the<[xy]{1,2}>", capsys.readouterr().out.strip().splitlines()[0])
    (tmp_path / "bad.json").write_text('{"type": "strng"}')
    assert main(["generate", str(run), "--prompt", "the", "--json-schema", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: json_schema is not valid JSON Schema") and "\n" not in err


# ---------------------------------------------------------------------------------------------------- tokenizer bridge


def _bridge_round_trip(t, backend: str):
    v = token_vocab(t)
    c = compile_constraint("regex", "(.|\n)*", t, backend=backend)
    m = c.allowed_mask()
    if backend == "llguidance":
        engine_tok = c.m   # the engine's own decode of every id must give back the lmstack token bytes
        from lmstack.infer.constrain import _ENGINES
        lt = next(s["tok"] for k, s in _ENGINES[t].items() if k[0] == "llguidance")
        for i in range(v.vocab_size):
            # llguidance reads a leading 0xFF byte as its special-token marker: such a token (never valid
            # UTF-8) decodes to nothing there and is never allowed as text
            if i not in v.special and not t.token_bytes(i).startswith(b"\xff"):
                assert lt.decode_bytes([i]) == t.token_bytes(i), i
        del engine_tok
    else:
        from lmstack.infer.constrain import _ENGINES
        comp = next(s["compiler"] for k, s in _ENGINES[t].items() if k[0] == "xgrammar")
        info = comp.compile_regex("a").tokenizer_info
        decoded = info.decoded_vocab
        for i in range(v.vocab_size):
            if i not in v.special:
                assert decoded[i] == t.token_bytes(i), i
    for i in v.special - set(v.eos):
        assert not m[i]            # special tokens are never text
    for e in v.eos:
        assert m[e]                # the empty text is in (.|\n)*: the stop id may end it


@pytest.mark.parametrize("backend", BACKENDS)
def test_bridge_our_bpe_every_token_round_trips(tok, backend):
    _bridge_round_trip(tok, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["models/stories260K", "tokenizers/gpt2", "tokenizers/bert-base-uncased"])
def test_bridge_hf_tokenizers_every_token_round_trips(shared_data, backend, name):
    from lmstack.tokenizer import load_tokenizer

    folder = shared_data / name
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    t = load_tokenizer(folder)
    if t.eos_id is None:   # BERT: [SEP] is its EOS name; guard anyway
        pytest.skip("tokenizer without EOS")
    _bridge_round_trip(t, backend)
    # and a constrained run over it: an integer schema allows digits only, then the stop id
    c = compile_constraint("json_schema", {"type": "integer", "minimum": 0, "maximum": 99}, t, backend=backend)
    allowed = unpack_bitmask(_fill(c), t.vocab_size)[0]
    texts = {t.token_bytes(i) for i in allowed.nonzero().flatten().tolist()}
    assert texts and all(re.fullmatch(rb"[0-9]+", x) for x in texts), sorted(texts)[:10]


def _fill(c):
    bm = allocate_bitmask(1, c.vocab_size)
    c.fill_bitmask(bm, 0)
    return bm


def test_padded_model_vocabulary_rows_are_never_allowed(tok):
    c = compile_constraint("regex", "(.|\n)*", tok, vocab_size=tok.vocab_size + 13, eos=[tok.eos_id])
    m = c.allowed_mask()
    assert m.shape == (tok.vocab_size + 13,) and not m[tok.vocab_size:].any()


# ---------------------------------------------------------------------------------------------------- remote models


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "pop": {"type": "integer", "minimum": 0}},
          "required": ["city", "pop"], "additionalProperties": False}


def test_validate_json_errors_say_where():
    assert validate_json('{"city": "Oslo", "pop": 700000}', SCHEMA) == {"city": "Oslo", "pop": 700000}
    assert validate_json('Sure! ```json\n{"city": "Oslo", "pop": 1}\n```', SCHEMA)["pop"] == 1
    with pytest.raises(StructuredOutputError, match=r"invalid at pop: -1 is less than the minimum of 0 \(keyword 'minimum'\)"):
        validate_json('{"city": "Oslo", "pop": -1}', SCHEMA)
    with pytest.raises(StructuredOutputError, match="not JSON"):
        validate_json('{"city": "Oslo", "pop": }', SCHEMA)
    with pytest.raises(StructuredOutputError, match="keyword 'additionalProperties'"):
        validate_json('{"city": "Oslo", "pop": 1, "x": 0}', SCHEMA)


def test_generate_json_feeds_the_error_back_and_is_bounded():
    replies = iter(['{"city": "Oslo"}', '{"city": "Oslo", "pop": "many"}', '{"city": "Oslo", "pop": 5}'])
    seen = []

    def call(messages):
        seen.append(messages)
        return next(replies)

    res = generate_json(call, SCHEMA, max_retries=2, messages="Where?", return_attempts=True)
    assert res.value == {"city": "Oslo", "pop": 5} and len(res.attempts) == 3
    assert "'pop' is a required property" in seen[1][-1]["content"]        # the error went back
    assert seen[1][-2] == {"role": "assistant", "content": '{"city": "Oslo"}'}
    assert "Where?" in seen[0][0]["content"] and '"required"' in seen[0][0]["content"]   # schema as instruction

    calls = []
    with pytest.raises(StructuredOutputError, match=r"no valid JSON after 2 attempt\(s\)") as e:
        generate_json(lambda m: calls.append(m) or "nope", SCHEMA, max_retries=1)
    assert len(calls) == 2 and len(e.value.attempts) == 2
    with pytest.raises(LmstackError, match="max_retries"):
        generate_json(lambda m: "{}", SCHEMA, max_retries=-1)
