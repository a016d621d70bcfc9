"""Prompt templates: slots -> messages, strict variables, syntax errors, the sandbox, token budgets."""

from __future__ import annotations

import pytest

from lmstack.errors import LmstackError
from lmstack.prompts.template import PromptTemplate, as_messages
from lmstack.tokenizer import load_chat_template, train_bpe
from lmstack.tokenizer.chat import render_chat


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["You answer questions about maths. What is 3+3? Answer in one sentence. 2+2 is 4."] * 5, 300,
                     workers=1)


def full() -> PromptTemplate:
    return PromptTemplate(instruction="You answer questions about {{ topic }}.",
                          context="{% for d in docs %}[{{ loop.index }}] {{ d }}\n{% endfor %}",
                          input="{{ question }}", output_format="Answer in one sentence.",
                          examples=[{"input": "What is 2+2?", "output": "4."}], name="qa")


def test_slots_render_to_the_documented_messages():
    p = full().render(topic="maths", docs=["a doc", "b doc"], question="What is 3+3?")
    assert p.messages == [
        {"role": "system", "content": "You answer questions about maths.\n\nAnswer in one sentence."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "[1] a doc\n[2] b doc\n\n\nWhat is 3+3?"},
    ]
    assert p.openai_request("m", temperature=0) == {"model": "m", "messages": p.messages, "temperature": 0}
    assert p.text == "\n\n".join(m["content"] for m in p.messages)
    # empty slots are left out
    assert PromptTemplate(input="{{ q }}").render(q="hi").messages == [{"role": "user", "content": "hi"}]


def test_variables_are_found_across_slots_and_examples():
    t = PromptTemplate(instruction="{{ a }}", examples=[{"input": "{{ b }}", "output": "{% set c = 1 %}{{ c }}"}])
    assert t.variables() == {"a", "b"}     # c is set inside the template, not asked of the caller


def test_missing_and_unused_variables_are_errors():
    t = full()
    with pytest.raises(LmstackError, match=r"^prompt 'qa': missing variable\(s\) docs, question; the template "
                                           r"needs docs, question, topic$"):
        t.render(topic="x")
    with pytest.raises(LmstackError, match=r"^prompt 'qa': variable\(s\) questoin not used by the template"):
        t.render(topic="x", docs=[], question="q", questoin="typo")


def test_undefined_attribute_is_a_one_line_error():
    with pytest.raises(LmstackError, match=r"^prompt 'prompt' field 'input': 'dict object' has no attribute 'title'$"):
        PromptTemplate(input="{{ doc.title }}").render(doc={"body": "x"})


def test_syntax_error_names_slot_and_line():
    with pytest.raises(LmstackError) as e:
        PromptTemplate(instruction="ok", context="line one\nline two {{ x }\n", name="bad")
    msg = str(e.value)
    assert msg.startswith("prompt 'bad' field 'context': template syntax error at line 2: ")
    assert "\n" not in msg


def test_sandbox_refuses_python_internals():
    with pytest.raises(LmstackError, match="refused by the sandbox"):
        PromptTemplate(input="{{ x.__class__.__mro__ }}").render(x=1)
    with pytest.raises(LmstackError, match="refused by the sandbox"):   # immutable: no mutation of inputs
        PromptTemplate(input="{{ xs.append(1) }}").render(xs=[])


def test_fields_round_trip_and_bad_fields():
    t = full()
    assert PromptTemplate.from_fields(t.fields(), name="qa") == t
    with pytest.raises(LmstackError, match="unknown template field\\(s\\) sytem"):
        PromptTemplate.from_fields({"sytem": "x"})
    with pytest.raises(LmstackError, match="examples\\[0\\]: expected exactly the string keys"):
        PromptTemplate(input="x", examples=[{"input": "a"}])
    with pytest.raises(LmstackError, match="every slot is empty"):
        PromptTemplate()


def test_token_ids_go_through_the_local_chat_template(tok):
    p = full().render(topic="maths", docs=[], question="What is 3+3?")
    assert p.token_ids(tok) == render_chat(tok, p.messages, add_generation_prompt=True)[0]
    assert p.count_tokens(tok, chat=False) == len(tok.encode(p.text))


def test_token_ids_with_a_hugging_face_chat_template(tok, shared_data):
    folder = shared_data / "chat_templates" / "Qwen2.5-Instruct"
    tpl = load_chat_template(folder)
    p = full().render(topic="maths", docs=[], question="What is 3+3?")
    tok.chat_template = tpl
    try:
        ids = p.token_ids(tok)
    finally:
        del tok.chat_template
    rendered = tpl.render(p.messages, add_generation_prompt=True)
    assert tok.decode(ids) == rendered and rendered.startswith("<|im_start|>system\nYou answer questions about maths.")


def test_budget_check(tok):
    p = full().render(topic="maths", docs=["2+2 is 4."] * 20, question="What is 3+3?")
    n = p.count_tokens(tok)
    assert p.check_budget(tok, budget=n + 10, max_new_tokens=10) == n
    with pytest.raises(LmstackError, match=f"^prompt is {n} tokens \\+ max_new_tokens 11 = {n + 11}, over the "
                                           f"context budget of {n + 10}; "):
        p.check_budget(tok, budget=n + 10, max_new_tokens=11)


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
