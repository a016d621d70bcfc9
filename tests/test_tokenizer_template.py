"""Hugging Face chat templates: parity with transformers' apply_chat_template on the real configs of
../shared/data/chat_templates (Qwen2.5, Llama-3.2, Mistral-7B-v0.3), plus the error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.tokenizer import load_chat_template

TEMPLATES = ("Qwen2.5-Instruct", "Llama-3.2-3B-Instruct", "Mistral-7B-Instruct-v0.3")

TURNS = [
    {"role": "user", "content": "Hi! What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?\nAnswer <b>briefly</b> & \"quoted\"."},
]
SYSTEM = {"role": "system", "content": "You are terse."}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}, "b": {"type": "number"}},
                                               "required": ["a", "b"]}}}]


def hf_tokenizer(folder: Path):
    """A transformers tokenizer with the folder's chat template and special tokens over a stand-in vocabulary
    (these folders hold no vocabulary; the template only sees token strings)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = config.get(name)
        if isinstance(v, dict):
            v = v["content"]
        if isinstance(v, str):
            tokens[name] = v
    vocab = {"word": 0, **{v: i + 1 for i, v in enumerate(dict.fromkeys(tokens.values()))}}
    backend = Tokenizer(WordLevel(vocab, unk_token="word"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tok.chat_template = config["chat_template"]
    return tok


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("gen", [False, True])
def test_render_equals_transformers(shared_data, name, system, gen):
    folder = shared_data / "chat_templates" / name
    ours = load_chat_template(folder)
    ref = hf_tokenizer(folder)
    # Mistral v0.3 requires alternating user/assistant and ends on a user turn when generating.
    for turns in (TURNS, TURNS[:1], TURNS + [{"role": "assistant", "content": "6."}]):
        messages = ([SYSTEM] if system else []) + turns
        kw = {"date_string": "26 Jul 2024"}
        try:
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
        except Exception as e:  # noqa: BLE001 - the template itself refuses this conversation: so must ours
            with pytest.raises(LmstackError, match=str(e).split("\n")[0][:40].replace("(", r"\(")
                               .replace(")", r"\)").replace("[", r"\[").replace("?", r"\?")):
                ours.render(messages, add_generation_prompt=gen, **kw)
            continue
        assert ours.render(messages, add_generation_prompt=gen, **kw) == expected


@pytest.mark.parametrize("name", TEMPLATES)
def test_tools_render_equals_transformers(shared_data, name):
    folder = shared_data / "chat_templates" / name
    ref = hf_tokenizer(folder)
    messages = [SYSTEM, TURNS[0]]
    kw = {"date_string": "26 Jul 2024"}
    expected = ref.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True, **kw)
    assert load_chat_template(folder).render(messages, add_generation_prompt=True, tools=TOOLS, **kw) == expected


def test_config_file_and_jinja_file(shared_data, tmp_path):
    cfg = shared_data / "chat_templates" / "Qwen2.5-Instruct" / "tokenizer_config.json"
    a = load_chat_template(cfg).render([TURNS[0]], add_generation_prompt=True)
    assert a.startswith("<|im_start|>system\nYou are Qwen")
    assert a.endswith("<|im_start|>assistant\n")
    source = json.loads(cfg.read_text(encoding="utf-8"))["chat_template"]
    (tmp_path / "chat_template.jinja").write_text(source, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    assert load_chat_template(tmp_path).render([TURNS[0]], add_generation_prompt=True) == a


def test_named_templates_default_and_tool_use(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<B>", "special": True}, "eos_token": "<E>",
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}"
                                                          "{{ eos_token }}{% endfor %}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}]}), encoding="utf-8")
    tpl = load_chat_template(tmp_path)
    assert tpl.render(TURNS[:2]) == "<B>Hi! What is 2+2?<E>4.<E>"
    assert tpl.render(TURNS[:2], tools=TOOLS) == "T1"


def test_template_that_raises_is_one_line_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must "
                         "alternate user/assistant/user/assistant/...') }}{% endif %}ok"}), encoding="utf-8")
    tpl = load_chat_template(tmp_path)
    assert tpl.render(TURNS[:1]) == "ok"
    with pytest.raises(LmstackError, match=r"Conversation roles must alternate user/assistant") as e:
        tpl.render([SYSTEM])
    assert "\n" not in str(e.value)


def test_sandbox_refuses_python_internals(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}", encoding="utf-8")
    with pytest.raises(LmstackError):
        load_chat_template(tmp_path).render(TURNS[:1])


def test_folder_without_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(LmstackError, match="no chat template"):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(LmstackError, match="not UTF-8"):
        load_chat_template(tmp_path)
