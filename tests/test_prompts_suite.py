"""Prompt test suites: assertions, repeats with Wilson intervals, comparisons that flag a regressed version,
and the exit codes of ``lmstack prompt test`` (a deterministic fake generator stands in for a model)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.errors import ConfigError
from lmstack.eval.llm import Completion
from lmstack.prompts.registry import open_registry
from lmstack.prompts.suite import (
    compare,
    fisher_less,
    format_comparison,
    judge_pairwise,
    pass_variance,
    run_suite,
    suite_from_dict,
    text_generator,
    wilson_interval,
)
from lmstack.prompts.template import PromptTemplate

GOOD = PromptTemplate(instruction="Be precise.", input="{{ question }}")
BAD = PromptTemplate(instruction="Be creative.", input="{{ question }}")

SUITE = {
    "name": "capitals", "repeats": 3, "min_pass_rate": 0.6,
    "cases": [
        {"id": "france", "vars": {"question": "capital of France?"},
         "assert": [{"contains": "Paris"}, {"regex": "^The capital"}, {"not_contains": "London"}]},
        {"id": "json", "vars": {"question": "capital of Italy as JSON"},
         "assert": [{"json_schema": {"type": "object", "required": ["city"],
                                     "properties": {"city": {"enum": ["Rome"]}}}}]},
        {"id": "exact", "vars": {"question": "capital of Spain?"},
         "assert": [{"equals": "the capital is madrid.", "ignore_case": True},
                    {"metric": "exact_match", "reference": "The capital is Madrid.", "min": 1.0}]},
        {"id": "flaky", "vars": {"question": "capital of Peru?"}, "min_pass_rate": 0.5,
         "assert": [{"contains": "Lima"}]},
    ],
}


class Fake:
    """Deterministic: precise prompts answer right; creative ones get France and the JSON wrong; Peru is
    right on 2 of every 3 calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, messages):
        self.calls += 1
        system, question = messages[0]["content"], messages[-1]["content"]
        precise = "precise" in system
        if "France" in question:
            return "The capital is Paris." if precise else "London, probably."
        if "Italy" in question:
            return json.dumps({"city": "Rome"}) if precise else "{'city': 'Rome'}"
        if "Spain" in question:
            return "The capital is Madrid.\n"
        return "Lima" if self.calls % 3 else "Cusco"


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 3), (2, 3), (3, 3), (7, 20), (50, 100), (1, 1)]:
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    ref = stats.binomtest(4, 9).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_interval(4, 9, 0.9) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_fisher_and_variance_match_references():
    stats = pytest.importorskip("scipy.stats")
    for ka, na, kb, nb in [(3, 3, 0, 3), (3, 3, 1, 3), (10, 10, 5, 10), (2, 5, 4, 5), (0, 4, 0, 4)]:
        ref = stats.fisher_exact([[kb, nb - kb], [ka, na - ka]], alternative="less").pvalue
        assert fisher_less(ka, na, kb, nb) == pytest.approx(ref, rel=1e-9)
    for k, n in [(0, 3), (2, 3), (4, 9)]:
        assert pass_variance(k, n) == pytest.approx(np.var([1] * k + [0] * (n - k), ddof=1))
    assert pass_variance(1, 1) == 0.0


def test_run_suite_pass_rates_and_intervals():
    suite = suite_from_dict(SUITE)
    res = run_suite(suite, Fake(), GOOD, label="good")
    by = {c.id: c for c in res.cases}
    assert [(c.id, c.passes, c.n) for c in res.cases] == [("france", 3, 3), ("json", 3, 3), ("exact", 3, 3),
                                                          ("flaky", 2, 3)]
    assert by["flaky"].ci == wilson_interval(2, 3) and by["flaky"].variance == pytest.approx(1 / 3)
    assert by["flaky"].ok and res.ok                                 # 2/3 >= the case's 0.5
    assert (res.passes, res.n, res.ci) == (11, 12, wilson_interval(11, 12))
    assert by["exact"].checks[1]["score_mean"] == 1.0 and by["exact"].checks[1]["kind"] == "metric"
    failed = [r for r in by["flaky"].runs if not r["passed"]]
    assert failed == [{"output": "Cusco", "passed": False, "failures": ["contains: missing ['Lima']"]}]


def test_regressed_version_is_flagged():
    suite = suite_from_dict(SUITE)
    base = run_suite(suite, Fake(), GOOD, label="qa@1")
    cand = run_suite(suite, Fake(), BAD, label="qa@2")
    by = {c.id: c for c in cand.cases}
    assert by["france"].runs[0]["failures"] == ["contains: missing ['Paris']", "regex: no match for '^The capital'",
                                                "not_contains: contains ['London']"]
    assert by["json"].runs[0]["failures"][0].startswith("json_schema: not JSON (Expecting property name")
    cmp = compare(base, cand, alpha=0.05)
    assert [r["id"] for r in cmp.regressions] == ["france", "json"]
    row = cmp.rows[0]
    assert row["p_value"] == pytest.approx(0.05) and "fell below min_pass_rate 0.6" in row["reason"]
    assert not cmp.improvements and not compare(base, base).regressions
    assert "REGRESSION" in format_comparison(cmp)
    assert [r["id"] for r in compare(cand, base).improvements] == ["france", "json"]
    # with 6 runs each the drop is also significant on its own: p = 1 / C(12, 6)
    six = compare(run_suite(suite, Fake(), GOOD, repeats=6), run_suite(suite, Fake(), BAD, repeats=6))
    assert six.rows[0]["p_value"] == pytest.approx(1 / 924)
    assert six.rows[0]["reason"].startswith("pass rate fell 1.00 -> 0.00 (Fisher p=0.00108 < 0.05); ")


def test_rubric_uses_the_judge_with_samples():
    class Judge:
        name = "fake-judge"

        def __init__(self):
            self.seen = []

        def complete(self, prompts, *, max_tokens=256, temperature=0.0, n=1, stop=(), top_logprobs=0, seed=None):
            self.seen.append((len(prompts), n, temperature))
            return [[Completion("9" if "Paris" in p.split("Answer:")[1] else "2") for _ in range(n)] for p in prompts]

    suite = suite_from_dict({"repeats": 2, "cases": [{"id": "r", "vars": {"question": "capital of France?"},
                                                      "assert": [{"rubric": "Correct?", "min": 7, "samples": 3}]}]})
    judge = Judge()
    good = run_suite(suite, Fake(), GOOD, judge=judge)
    bad = run_suite(suite, Fake(), BAD, judge=judge)
    assert judge.seen == [(2, 3, 0.7), (2, 3, 0.7)]         # one batched call per case, 3 samples each
    assert good.cases[0].passes == 2 and bad.cases[0].passes == 0
    assert good.cases[0].checks[0]["score_mean"] == 9.0 and "judge_length_bias" in good.cases[0].checks[0]


class PairJudge:
    """Prefers the answer that names Paris; asked about the same pair in both orders."""

    name = "pair-judge"

    def __init__(self):
        self.prompts = []

    def complete(self, prompts, *, max_tokens=256, temperature=0.0, n=1, stop=(), top_logprobs=0, seed=None):
        self.prompts += prompts
        out = []
        for p in prompts:
            first = p.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            second = p.split("Answer B:\n")[1].split("\n\nWhich")[0]
            verdict = "tie" if ("Paris" in first) == ("Paris" in second) else "A" if "Paris" in first else "B"
            out.append([Completion(verdict)])
        return out


def test_pairwise_judge_side_by_side():
    suite = suite_from_dict({"repeats": 2, "cases": [
        {"id": "fr", "vars": {"question": "capital of France?"}, "assert": [{"contains": "Paris"}]},
        {"id": "es", "vars": {"question": "capital of Spain?"}, "assert": [{"contains": "Madrid"}]}]})
    cmp = compare(run_suite(suite, Fake(), GOOD), run_suite(suite, Fake(), BAD))
    judge = PairJudge()
    pw = judge_pairwise(cmp, judge, "Which is correct?")
    assert len(judge.prompts) == 8                          # 4 pairs, each in both orders
    assert judge.prompts[0].count("London, probably.") == 1 and "capital of France?" in judge.prompts[0]
    # France: the baseline wins both pairs (0); Spain: identical answers, ties (0.5) -> 0.25
    assert pw["pairs"] == 4 and pw["candidate_win_rate"] == 0.25
    assert pw["consistency_rate"] == 1.0 and pw["first_position_rate"] == 0.5


def test_messages_cases_and_text_generator():
    suite = suite_from_dict({"cases": [{"id": "m", "messages": "say hi", "assert": [{"equals": "USER: say hi"}]}]})
    res = run_suite(suite, text_generator(lambda text: "USER: " + text))
    assert res.ok


@pytest.mark.parametrize("case, message", [
    ({"assert": [{"contain": "x"}]}, r"give exactly one of equals, contains"),
    ({"assert": [{"regex": "("}]}, r"regex '\(' does not compile"),
    ({"assert": [{"json_schema": {"type": "objekt"}}]}, r"not a valid JSON Schema: 'objekt' is not valid"),
    ({"assert": [{"metric": "bleu", "min": 0.1}]}, r"metric 'bleu' needs a reference"),
    ({"assert": [{"metric": "nope", "reference": "x", "min": 1}]}, r"unknown metric 'nope'"),
    ({"assert": [{"contains": "x", "strip": True}]}, r"unknown option\(s\) strip for contains"),
    ({"assert": []}, r"'assert' must be a non-empty list"),
])
def test_bad_suites_name_the_case(case, message):
    with pytest.raises(ConfigError, match=message):
        suite_from_dict({"cases": [{"id": "c1", **case}]})


FAKE_MODULE = textwrap.dedent('''
    calls = [0]
    def generate(messages):
        calls[0] += 1
        precise = "precise" in messages[0]["content"]
        q = messages[-1]["content"]
        if "France" in q:
            return "The capital is Paris." if precise else "London, probably."
        return "Lima"
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fakegen.py").write_text(FAKE_MODULE, encoding="utf-8")
    db = str(tmp_path / "reg.sqlite")
    reg = open_registry(db)
    reg.add("qa", GOOD, label="production")
    reg.add("qa", BAD, label="staging")
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent("""
        name: capitals
        prompt: qa@production
        repeats: 3
        cases:
          - id: france
            vars: {question: "capital of France?"}
            assert: [{contains: Paris}]
          - id: peru
            vars: {question: "capital of Peru?"}
            assert: [{contains: Lima}]
    """), encoding="utf-8")
    return tmp_path, ["--db", db, "--generator", "fakegen:generate"]


def test_cli_exit_codes(project, capsys):
    tmp, opts = project
    assert main(["prompt", "test", str(tmp / "suite.yaml"), *opts]) == 0              # qa@production passes
    assert "**capitals** (qa@production): 6/6 runs pass" in capsys.readouterr().out
    assert main(["prompt", "test", str(tmp / "suite.yaml"), "--prompt", "qa@staging", *opts]) == 1
    assert main(["prompt", "test", str(tmp / "suite.yaml"), "--prompt", "qa@staging", "--against", "qa@production",
                 "--out", str(tmp / "cmp.json"), *opts]) == 1
    out = capsys.readouterr().out
    # 3 runs each: Fisher p is 0.05 at best (not < alpha); the min_pass_rate rule flags it
    assert "| france | 100% | 0% | -100 | 0.05 | REGRESSION: pass rate 0.00 fell below min_pass_rate 1 |" in out
    assert json.loads((tmp / "cmp.json").read_text())["regressions"] == ["france"]
    assert main(["prompt", "test", str(tmp / "suite.yaml"), "--prompt", "qa@production", "--against", "qa@staging",
                 *opts]) == 0                                                           # an improvement
    capsys.readouterr()
    assert main(["prompt", "test", str(tmp / "suite.yaml"), "--prompt", "qa@canary", *opts]) == 2
    assert capsys.readouterr().err == "error: prompt 'qa' has no label 'canary'; its labels: production, staging\n"
    (tmp / "bad.yaml").write_text("cases: [{id: a, assert: [{regex: '('}]}]\n", encoding="utf-8")
    assert main(["prompt", "test", str(tmp / "bad.yaml"), "--prompt", "qa", *opts]) == 2
    assert "case 'a' assert[0]: regex '(' does not compile" in capsys.readouterr().err
    assert main(["prompt", "test", str(tmp / "suite.yaml"), "--db", opts[1]]) == 2
    assert capsys.readouterr().err.startswith("error: prompt test: give --model RUN")


def test_cli_with_a_local_model(project, capsys):
    torch = pytest.importorskip("torch")
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    tmp, opts = project
    tok = train_bpe(["What is the capital of France? Paris is."] * 5, vocab_size=280, workers=1)
    torch.manual_seed(0)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64)),
         tmp / "run")
    tok.save(tmp / "run")
    (tmp / "any.yaml").write_text("repeats: 2\ncases: [{id: a, vars: {question: hi}, assert: [{regex: '[\\s\\S]*'},"
                                  " {not_contains: '<|end|>'}]}]\n", encoding="utf-8")
    (tmp / "never.yaml").write_text("cases: [{id: a, vars: {question: hi}, assert: [{equals: 'no model says this'}]}]\n",
                                    encoding="utf-8")
    local = [opts[0], opts[1], "--model", str(tmp / "run"), "--max-new-tokens", "4"]
    assert main(["prompt", "test", str(tmp / "any.yaml"), "--prompt", "qa@1", *local]) == 0
    assert "2/2 runs pass" in capsys.readouterr().out
    assert main(["prompt", "test", str(tmp / "any.yaml"), "--prompt", "qa@1", *local, "--plain"]) == 0
    capsys.readouterr()
    assert main(["prompt", "test", str(tmp / "never.yaml"), "--prompt", "qa@1", *local, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["result"]["cases"][0]["passes"] == 0
    (tmp / "long.yaml").write_text("cases: [{id: a, vars: {question: '" + "France " * 80 + "'}, assert: [{regex: x}]}]\n",
                                   encoding="utf-8")
    assert main(["prompt", "test", str(tmp / "long.yaml"), "--prompt", "qa@1", *local]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt is ") and err.endswith(" over the context budget of 64; shorten the context "
                                                                "or lower max_new_tokens\n")


def test_remote_models_and_judge(project, capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            last = body["messages"][-1]["content"]
            if body["model"] == "judge":            # pairwise: prefer the answer naming Paris
                first = last.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
                second = last.split("Answer B:\n")[1].split("\n\nWhich")[0]
                content = "tie" if ("Paris" in first) == ("Paris" in second) else "A" if "Paris" in first else "B"
            elif body["model"] == "good" or "precise" in body["messages"][0]["content"]:
                content = "Paris and Lima"
            else:
                content = "Lima"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    tmp, opts = project
    base = ["prompt", "test", str(tmp / "suite.yaml"), opts[0], opts[1], "--max-new-tokens", "9"]
    try:
        # two prompt versions on one remote model
        assert main([*base, "--model", f"{url}#m", "--prompt", "qa@staging", "--against", "qa@production"]) == 1
        assert "| france | 100% | 0% | -100 |" in capsys.readouterr().out
        assert len(seen) == 12 and seen[0]["model"] == "m" and seen[0]["max_tokens"] == 9
        assert seen[0]["messages"] == [{"role": "system", "content": "Be creative."},
                                       {"role": "user", "content": "capital of France?"}]
        assert [b["seed"] for b in seen[:3]] == [0, 1, 2]                   # repeats differ
        # two models, one prompt, and the judge side by side
        seen.clear()
        assert main([*base, "--prompt", "qa@staging", "--model", f"{url}#good", "--against-model", f"{url}#bad",
                     "--judge", f"{url}#judge", "--pairwise-rubric", "Which is right?", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert out["improvements"] == ["france"] and out["regressions"] == []
    # "good" names Paris in every reply, "bad" never: the judge prefers good in all 6 pairs, in both orders
    assert out["pairwise"]["pairs"] == 6 and out["pairwise"]["candidate_win_rate"] == 1.0
    assert out["pairwise"]["consistency_rate"] == 1.0 and out["pairwise"]["first_position_rate"] == 0.5
    assert sum(b["model"] == "judge" for b in seen) == 12                                   # both orders


def test_a_base_model_without_chat_template(shared_data):
    from lmstack.errors import LmstackError
    from lmstack.infer.text import load_run
    from lmstack.prompts.suite import local_generator

    folder = shared_data / "models" / "stories260K"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    model, tok = load_run(folder)
    suite = suite_from_dict({"repeats": 2, "cases": [{"id": "story", "vars": {"question": "Once upon a time"},
                                                      "assert": [{"regex": r"\w+"}]}]})
    tpl = PromptTemplate(input="{{ question }}")
    res = run_suite(suite, local_generator(model, tok, max_new_tokens=8, chat=False), tpl)
    assert res.passes == 2 and res.cases[0].runs[0]["output"] != res.cases[0].runs[1]["output"]   # seeds differ
    with pytest.raises(LmstackError, match="this model has no chat template"):
        run_suite(suite, local_generator(model, tok, max_new_tokens=8), tpl)


def test_remote_generator_sends_the_conversation_whole_through_the_clients_request():
    from lmstack.eval.llm import Completion
    from lmstack.prompts.suite import remote_generator

    class FakeClient:
        mode, model = "chat", "m"

        def __init__(self):
            self.bodies = []

        def request(self, body):
            self.bodies.append(body)
            return [Completion(f"reply {len(self.bodies)}", None, "stop")]

    client = FakeClient()
    gen = remote_generator(client, max_tokens=7, seed=10)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    assert gen(msgs) == "reply 1" and gen(msgs) == "reply 2"
    first, second = client.bodies
    assert first["messages"] == msgs and first["max_tokens"] == 7 and first["model"] == "m"
    assert (first["seed"], second["seed"]) == (10, 11)
    client.mode = "completions"
    with pytest.raises(ConfigError, match="chat"):
        remote_generator(client)
