"""The real pre-trained stories260K (karpathy's tinyllamas, Hugging Face form in ../shared/data): logits,
greedy ids, held-out loss and multiple-choice log-likelihoods equal transformers'; it works through the CLI
(generate, chat, eval) and the Python API; stop ids (it ends a story with BOS) are configurable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.infer.config import GenerationConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder():
    from conftest import SHARED_DATA

    f = SHARED_DATA / "models" / "stories260K"
    if not (f / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {f} (optional: see shared/data/README.md)")
    return f


@pytest.fixture(scope="module")
def ours(folder):
    from lmstack.infer.text import load_run

    return load_run(folder)


@pytest.fixture(scope="module")
def ref(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ref_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def cli(*argv: str) -> int:
    from lmstack.cli import LAYER_CLIS, main

    for mod in ("lmstack.infer.cli", "lmstack.eval.cli"):
        if mod not in LAYER_CLIS:
            LAYER_CLIS.append(mod)
    return main(list(argv))


PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog was sad because"]


def test_tokenizer_and_bos_rule_match_transformers(ours, ref_tok):
    _, tok = ours
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    for text in PROMPTS + ["Hi!\n\tcode: x = [1, 2]  # ünïcode 🙂", ""]:
        assert [tok.bos_id] + tok.encode(text) == ref_tok(text)["input_ids"]
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_logits_equal_transformers(ours, ref, ref_tok):
    model, _ = ours
    ids = torch.tensor([ref_tok(PROMPTS[0] + ", there was a big red ball.")["input_ids"]])
    a, b = model(ids), ref(ids).logits
    # Within 1e-5 (+1e-6 relative: logits reach ~15, where fp32 rounding alone is ~1e-6 per op).
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-5), (a - b).abs().max()
    assert (a - b).abs().max().item() <= 2e-5


@torch.no_grad()
def test_greedy_ids_equal_hf_generate(ours, ref, ref_tok):
    from lmstack.infer import generate

    model, _ = ours
    for prompt in PROMPTS:
        x = torch.tensor([ref_tok(prompt)["input_ids"]])
        expected = ref.generate(x, max_new_tokens=60, do_sample=False, eos_token_id=2, pad_token_id=0)
        got = generate(model, x, GenerationConfig(max_new_tokens=60, eos_token_id=2))
        assert got[0, :expected.shape[1]].tolist() == expected[0].tolist()


@torch.no_grad()
def test_heldout_loss_equals_transformers(ours, ref, folder):
    from conftest import SHARED_DATA

    from lmstack.eval.lm import text_nll

    model, tok = ours
    text = (SHARED_DATA / "text" / "tinystories" / "tinystories_valid_sample.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text[:20_000].split("\n") if p.strip()]
    # Ours: each paragraph scored after BOS (the tokenizer's rule), windows of the whole context.
    res = text_nll(model, tok, paragraphs)
    nll_ours = sum(r.nll for r in res) / sum(r.n_tokens for r in res)
    nll_ref, n_ref = 0.0, 0
    for p in paragraphs:
        ids = torch.tensor([[1] + tok.encode(p)])
        assert ids.shape[1] <= 512
        out = ref(ids, labels=ids)
        k = ids.shape[1] - 1
        nll_ref += out.loss.item() * k
        n_ref += k
    assert sum(r.n_tokens for r in res) == n_ref
    assert abs(nll_ours - nll_ref / n_ref) <= 1e-5
    assert 1.0 < nll_ours < 2.5  # the README's figure for this sample is ~1.5-1.6 nats


@torch.no_grad()
def test_multiple_choice_scores_with_bos_like_lm_eval(ours, ref, ref_tok, tmp_path, shared_data):
    """A tiny multiple-choice set through the harness: per-choice log-likelihoods equal transformers'
    computed by hand with BOS first (lm-eval >= 0.4.9.2 on this tokenizer); add_bos=False changes them."""
    from lmstack.eval.harness import TaskConfig, run_task

    rows = [{"question": "Lily went to the park. She saw a big", "choices": ["dog", "car", "sky"], "label": 0},
            {"question": "Tom was sad because he lost his", "choices": ["ball", "the", "run"], "label": 0},
            {"question": "Once upon a time, there was a little", "choices": ["girl", "tree", "blue"], "label": 0}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model, tok = ours
    task = TaskConfig(name="mc", kind="multiple_choice", path=str(path))
    res = run_task(task, model=model, tokenizer=tok, data_dir=tmp_path)
    for r, rec in zip(rows, res.records):
        for choice, ll in zip(r["choices"], rec["loglikelihoods"]):
            ctx = [1] + tok.encode(r["question"])
            whole = [1] + tok.encode(r["question"] + " " + choice)
            assert whole[:len(ctx)] == ctx
            x = torch.tensor([whole])
            logp = F.log_softmax(ref(x).logits[0, :-1].float(), -1)
            expected = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
            assert abs(ll - expected) <= 1e-4
    no_bos = run_task(TaskConfig(name="mc", kind="multiple_choice", path=str(path), add_bos=False),
                      model=model, tokenizer=tok, data_dir=tmp_path)
    assert no_bos.records[0]["loglikelihoods"] != res.records[0]["loglikelihoods"]


def test_python_api_and_stop_on_bos(ours):
    from lmstack.infer.text import generate_completions, generate_text

    model, tok = ours
    text = generate_text(model, tok, "Once upon a time", GenerationConfig(max_new_tokens=20))
    assert text.startswith(", there was a little girl named Lily")
    # The model ends a story with BOS (1); generation_config says EOS (2): without stop id 1 it runs on.
    long = GenerationConfig(max_new_tokens=300)
    runs_on = generate_completions(model, tok, ["Once"], long)[0]
    stops = generate_completions(model, tok, ["Once"], long.replace(eos_token_id=[2, 1]))[0]
    assert runs_on.finish_reason == "length" and runs_on.n_tokens == 300
    assert stops.finish_reason == "stop" and stops.n_tokens < 300
    assert runs_on.text.startswith(stops.text)


def test_cli_generate_json_stop_id_and_timing(folder, capsys):
    assert cli("generate", str(folder), "--prompt", "Once", "--max_new_tokens", "400", "--stop-id", "1",
               "--json") == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert row["finish_reason"] == "stop" and row["new_tokens"] < 400
    assert "tokens/s" in err
    assert cli("generate", str(folder), "--prompt", "Once", "--max_new_tokens", "5", "--json",
               "--stop-token", "<s>") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["finish_reason"] == "length"
    assert cli("generate", str(folder), "--prompt", "Once", "--stop-id", "9999") == 2
    assert "not a token id" in capsys.readouterr().err


def test_cli_chat_uses_the_folders_hf_template(folder, tmp_path, monkeypatch, capsys):
    import io

    hf = tmp_path / "stories"
    shutil.copytree(folder, hf)
    config = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if not loop.last %} "
                               "{% endif %}{% endfor %}")
    (hf / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\n/reset\nLily\n"))
    assert cli("chat", str(hf), "--max_new_tokens", "12") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(", there was a little girl")
    assert len(out) == 2
    # Without a template the HF folder says so in one line.
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli("chat", str(folder), "--max_new_tokens", "4") == 2
    assert "this model has no chat template" in capsys.readouterr().err


def test_cli_eval_bench_perplexity(folder, shared_data, capsys, tmp_path):
    assert cli("eval", "bench", str(folder), "--tasks", "tinystories_ppl", "--limit", "5", "--data-dir",
               str(shared_data), "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "tinystories_ppl" in out and "perplexity" in out
    runs = {}
    for flag in ("auto", "false"):
        path = tmp_path / f"{flag}.json"
        assert cli("eval", "bench", str(folder), "--tasks", "tinystories_ppl", "--limit", "5", "--data-dir",
                   str(shared_data), "--device", "cpu", "--add-bos", flag, "--json", str(path)) == 0
        runs[flag] = json.loads(path.read_text())["tasks"][0]["metrics"]
    # Without BOS the first token of each text is context only: fewer tokens scored.
    assert runs["false"]["tokens"] == runs["auto"]["tokens"] - 5


def test_damaged_folders_give_one_line_errors(folder, tmp_path):
    from lmstack.infer.text import load_run

    cases = {}
    for name in ("truncated", "random", "badconfig", "notutf8", "notok"):
        d = tmp_path / name
        shutil.copytree(folder, d)
        cases[name] = d
    data = (folder / "model.safetensors").read_bytes()
    (cases["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    (cases["random"] / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8)
                                                        .numpy().tobytes())
    (cases["badconfig"] / "config.json").write_text('{"model_type": "llama", "hidden_size": ', encoding="utf-8")
    (cases["notutf8"] / "config.json").write_bytes(b"\xff\xfe\x00{")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (cases["notok"] / f).unlink()
    for name, d in cases.items():
        with pytest.raises(LmstackError) as e:
            load_run(d)
        assert "\n" not in str(e.value), name
    with pytest.raises(LmstackError, match="no tokenizer next to the model"):
        load_run(cases["notok"])
    with pytest.raises(LmstackError, match="no such model folder"):
        load_run(tmp_path / "nope")


@pytest.mark.slow
def test_hellaswag_matches_lm_eval(ours, shared_data):
    """lm-eval 0.4.13 (hf backend, defaults) on these 1,000 items: acc 0.270, acc_norm 0.250 (issue 10);
    without BOS lmstack gave 0.274 / 0.246."""
    from lmstack.eval.harness import load_task, run_task

    model, tok = ours
    task = load_task("hellaswag")
    res = run_task(task, model=model, tokenizer=tok, data_dir=shared_data)
    assert res.n == 1000
    assert (round(res.metrics["acc"], 3), round(res.metrics["acc_norm"], 3)) == (0.270, 0.250)
    task.add_bos = False
    res = run_task(task, model=model, tokenizer=tok, data_dir=shared_data)
    assert (round(res.metrics["acc"], 3), round(res.metrics["acc_norm"], 3)) == (0.274, 0.246)
