"""Judges with a deterministic scripted LLM: G-Eval weighting, DAG traversal, SelfCheckGPT, bias controls;
the OpenAI-compatible client against a local HTTP server; the local client on a tiny model."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmstack.errors import ConfigError, LmstackError
from lmstack.eval.judges.bias import pairwise, parse_verdict, pointwise, prompt_sensitivity
from lmstack.eval.judges.dag import DAG
from lmstack.eval.judges.geval import GEvalConfig, geval, weighted_score
from lmstack.eval.judges.selfcheck import selfcheck, split_sentences
from lmstack.eval.llm import Completion, LLM, LocalLLM, OpenAICompatible


class ScriptedLLM:
    """Replies computed from the prompt by a plain function: deterministic, inspectable."""

    name = "scripted"

    def __init__(self, reply):
        self.reply = reply
        self.prompts: list[str] = []

    def complete(self, prompts, *, max_tokens=256, temperature=0.0, n=1, stop=(), top_logprobs=0, seed=None):
        self.prompts += list(prompts)
        out = []
        for p in prompts:
            rows = [self.reply(p, k, top_logprobs) for k in range(n)]
            out.append([r if isinstance(r, Completion) else Completion(r) for r in rows])
        return out


def test_scripted_llm_is_an_llm():
    assert isinstance(ScriptedLLM(lambda p, k, t: "x"), LLM)


# ---------------------------------------------------------------------------------------------------- G-Eval

DIST = {"3": math.log(0.5), " 4": math.log(0.3), "4": math.log(0.05), "x": math.log(0.1), "2": math.log(0.05)}


def geval_reply(prompt, k, top):
    if prompt.rstrip().endswith("Evaluation Steps:"):
        return "1. Read the source.\n2. Check each claim of the output.\n"
    if top:
        return Completion("3", [DIST])
    return ["4", "5", "no idea"][k % 3]


def test_geval_probability_weighting():
    llm = ScriptedLLM(geval_reply)
    cfg = GEvalConfig("Consistency", "Is every fact of the output supported by the source?")
    res = geval(llm, ["out one", "out two"], ["src one", "src two"], cfg)
    expected = (3 * 0.5 + 4 * 0.35 + 2 * 0.05) / 0.9                  # "x" is no score; " 4" and "4" merge
    assert res.scores == [pytest.approx(expected), pytest.approx(expected)]
    assert res.details[0]["method"] == "logprobs"
    assert res.details[0]["distribution"] == pytest.approx({2: 0.05 / 0.9, 3: 0.5 / 0.9, 4: 0.35 / 0.9})
    assert res.summary["steps"] == ["Read the source.", "Check each claim of the output."]
    assert "2. Check each claim of the output." in llm.prompts[1] and "src two" in llm.prompts[2]
    assert weighted_score({"a": 0.0}, 1, 5) is None


def test_geval_sampling_fallback_and_failures():
    llm = ScriptedLLM(lambda p, k, t: "Score: 9" if "bad" in p else ["4", "5", "no idea"][k % 3])
    cfg = GEvalConfig("Fluency", "Is it fluent?", steps=["Read it."], use_logprobs=False, n_samples=3)
    res = geval(llm, ["good output", "bad output"], ["s", "s"], cfg)
    assert res.scores[0] == pytest.approx(4.5) and res.details[0]["unparsed"] == 1
    assert res.scores[1] is None and res.failures[0]["index"] == 1   # 9 is out of 1-5: a failure, not a zero
    assert res.score == pytest.approx(4.5)


# ------------------------------------------------------------------------------------------------------- DAG

GRAPH = """
root: answers
nodes:
  answers:
    judge: "Does the output name the capital asked for?"
    options: {yes: short, no: 0}
  short:
    rule: {max_words: 6}
    options: {true: 5, false: 3}
"""


def capital_judge(prompt, k, top):
    output = prompt.split("Output:\n", 1)[1].split("\n\nAnswer with", 1)[0]
    if "???" in output:
        return "I cannot tell."
    return "Yes." if "Paris" in output else "No"


def test_dag_traversal_records_paths(tmp_path):
    path = tmp_path / "graph.yaml"
    path.write_text(GRAPH, encoding="utf-8")
    dag = DAG.from_file(path)
    items = [{"output": "Paris."}, {"output": "It is Paris, the city of light and art."}, {"output": "Lyon"},
             {"output": "???"}]
    res = dag.evaluate(ScriptedLLM(capital_judge), items)
    assert res.scores == [5.0, 3.0, 0.0, None]
    assert res.details[0]["path"] == [{"node": "answers", "outcome": "yes"}, {"node": "short", "outcome": "true"}]
    assert res.details[2]["path"] == [{"node": "answers", "outcome": "no"}]
    assert res.failures == [{"index": 3, "node": "answers", "reason": "reply names no option",
                             "reply": "I cannot tell."}]


def test_dag_rejects_bad_graphs():
    with pytest.raises(ConfigError, match="cycle"):
        DAG.from_dict({"root": "a", "nodes": {"a": {"rule": {"min_words": 1}, "options": {"true": "b", "false": 1}},
                                              "b": {"rule": {"min_words": 2}, "options": {"true": "a", "false": 0}}}})
    with pytest.raises(ConfigError, match="no node named 'c'"):
        DAG.from_dict({"root": "a", "nodes": {"a": {"rule": {"min_words": 1}, "options": {"true": "c", "false": 1}}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        DAG.from_dict({"root": "a", "nodes": {"a": {"options": {"true": 1}}}})


def test_dag_python_rule():
    dag = DAG.from_dict({"root": "r", "nodes": {"r": {"rule": lambda item: len(item["output"]) % 2 == 0,
                                                      "options": {"true": 1, "false": 0}}}})
    assert dag.evaluate(None, [{"output": "ab"}, {"output": "abc"}]).scores == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------ SelfCheck

ANSWER = "Marie Curie was born in Warsaw. She won two Nobel Prizes. She was the first person to walk on Mars."
SAMPLES = ["Marie Curie was born in Warsaw in 1867. She won two Nobel Prizes, in physics and chemistry.",
           "Born in Warsaw, Marie Curie won two Nobel Prizes.",
           "Marie Curie, born in Warsaw, won the Nobel Prize twice."]


def test_split_sentences():
    assert split_sentences(ANSWER) == ["Marie Curie was born in Warsaw.", "She won two Nobel Prizes.",
                                       "She was the first person to walk on Mars."]


def test_selfcheck_prompt_and_ngram_flag_the_hallucination():
    def support(prompt, k, top):
        context = prompt.split("Context: ", 1)[1].split("\n\nSentence:", 1)[0].lower()
        sentence = prompt.split("Sentence: ", 1)[1].split("\n", 1)[0].lower()
        return "Yes" if ("warsaw" in sentence and "warsaw" in context) or ("nobel" in sentence and "nobel" in context) \
            else "No"
    res = selfcheck([ANSWER], [SAMPLES], method="prompt", llm=ScriptedLLM(support))
    assert res.details[0]["sentence_scores"] == [0.0, 0.0, 1.0]
    assert res.scores[0] == pytest.approx(1 / 3)
    ngram = selfcheck([ANSWER], [SAMPLES], method="ngram").details[0]["sentence_scores"]
    assert ngram[2] > max(ngram[0], ngram[1])
    empty = selfcheck([""], [SAMPLES], method="ngram")
    assert empty.scores == [None] and empty.failures[0]["reason"] == "empty answer"


def test_selfcheck_bertscore_flags_the_hallucination():
    from lmstack.eval.metrics.bertscore import default_encoder_path

    try:
        default_encoder_path()
    except ConfigError as e:
        pytest.skip(str(e))
    scores = selfcheck([ANSWER], [SAMPLES], method="bertscore").details[0]["sentence_scores"]
    assert scores[2] > max(scores[0], scores[1])


# ------------------------------------------------------------------------------------------- bias controls

QUESTIONS = ["q1", "q2", "q3", "q4", "q5"]
SHORT = ["yes", "no way", "maybe so", "ok", "fine then"]
LONG = ["a much longer answer with many words", "another long answer that goes on and on", "long long long long",
        "this answer is longer than the other", "more words here than there"]


def test_pairwise_position_bias_is_measured():
    always_first = pairwise(ScriptedLLM(lambda p, k, t: "A"), QUESTIONS, SHORT, LONG, "Pick the better answer.")
    assert always_first.summary["consistency_rate"] == 0.0
    assert always_first.summary["first_position_rate"] == 1.0
    assert always_first.scores == [0.5] * 5                         # inconsistent verdicts become ties

    def prefers_longer(prompt, k, t):
        a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        b = prompt.split("Answer B:\n", 1)[1].split("\n\nWhich", 1)[0]
        return "Answer A is better" if len(a.split()) > len(b.split()) else "B"
    fair = pairwise(ScriptedLLM(prefers_longer), QUESTIONS, SHORT, LONG, "Pick the better answer.")
    assert fair.summary["consistency_rate"] == 1.0 and fair.summary["first_position_rate"] == 0.5
    assert fair.scores == [0.0] * 5 and fair.summary["win_rate_a"] == 0.0
    mixed = pairwise(ScriptedLLM(prefers_longer), QUESTIONS, SHORT[:3] + LONG[3:], LONG[:3] + SHORT[3:], "r")
    assert mixed.summary["length_bias"]["spearman"] > 0.8


def test_pairwise_unparseable_verdict_is_a_failure():
    res = pairwise(ScriptedLLM(lambda p, k, t: "hmm"), QUESTIONS[:2], SHORT[:2], LONG[:2], "r")
    assert res.scores == [None, None] and len(res.failures) == 2
    assert parse_verdict("Tie.") == "tie" and parse_verdict("I prefer B") == "B" and parse_verdict("x") is None


def test_pointwise_length_bias_variance_and_prompt_sensitivity():
    def by_length(prompt, k, t):
        answer = prompt.split("Answer:\n", 1)[1].split("\n\nRate", 1)[0]
        strict = "strict" in prompt.split("\n", 1)[0]
        return str(min(10, len(answer.split()) + k - (2 if strict else 0)))
    res = pointwise(ScriptedLLM(by_length), QUESTIONS, LONG, "Rate helpfulness.", n_samples=2, temperature=1.0)
    assert res.summary["length_bias"]["pearson"] > 0.9
    assert res.details[0]["samples"] == [7.0, 8.0] and res.details[0]["variance"] == pytest.approx(0.25)
    sens = prompt_sensitivity(ScriptedLLM(by_length), QUESTIONS, LONG, ["Rate helpfulness.", "Be strict: rate it."])
    assert sens["mean_spread"] == pytest.approx(2.0) and sens["mean_std"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- OpenAI-compatible over HTTP

class FakeServer:
    """A local OpenAI-compatible endpoint: answers G-Eval forms with log-probs, fails the first call."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_next = 1
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if server.fail_next:
                    server.fail_next -= 1
                    return self._send(503, {"error": "busy"})
                if body.get("model") == "nope":
                    return self._send(400, {"error": "unknown model"})
                prompt = body["messages"][-1]["content"]
                if prompt.rstrip().endswith("Evaluation Steps:"):
                    content, logprobs = "1. Read.\n2. Judge.", None
                else:
                    content = "3"
                    tops = [{"token": t, "logprob": v} for t, v in DIST.items()]
                    logprobs = {"content": [{"token": "3", "logprob": DIST["3"], "top_logprobs": tops}]}
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                if logprobs and body.get("logprobs"):
                    choice["logprobs"] = logprobs
                self._send(200, {"id": "x", "object": "chat.completion", "choices": [choice]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_geval_through_openai_compatible_client(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    cfg = GEvalConfig("Consistency", "Is every fact supported?")
    with FakeServer() as server:
        llm = OpenAICompatible(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", cache_dir=tmp_path / "cache",
                               max_concurrency=3, backoff_s=0.01)
        res = geval(llm, ["o1", "o2", "o3"], ["s1", "s2", "s3"], cfg)
        expected = (3 * 0.5 + 4 * 0.35 + 2 * 0.05) / 0.9
        assert res.scores == [pytest.approx(expected)] * 3
        assert llm.stats["retries"] == 1                                  # the 503 was retried
        assert server.requests[0]["path"] == "/v1/chat/completions" and server.requests[0]["auth"] == "Bearer sk-test"
        assert any(r["body"].get("top_logprobs") == 20 for r in server.requests)
        n_before = len(server.requests)
        again = geval(OpenAICompatible(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY",
                                       cache_dir=tmp_path / "cache"), ["o1", "o2", "o3"], ["s1", "s2", "s3"], cfg)
        assert again.scores == res.scores and len(server.requests) == n_before   # all from the cache
        with pytest.raises(LmstackError, match="HTTP 400"):
            OpenAICompatible(server.url, "nope", backoff_s=0.01).complete(["hi"])


def test_openai_client_unreachable_endpoint_is_a_clear_error():
    llm = OpenAICompatible("http://127.0.0.1:9/v1", "m", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(LmstackError, match="after 2 attempts"):
        llm.complete(["hi"])


# -------------------------------------------------------------------------------------------- local client

def test_local_llm_generates_with_logprobs_and_caches(tmp_path):
    import torch

    from lmstack.model import build_model, preset
    from lmstack.tokenizer import train_bpe

    tok = train_bpe(["one two three four five six seven eight nine ten " * 20], vocab_size=280)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_head=2, max_seq_len=64))
    llm = LocalLLM(model, tok, cache_dir=tmp_path / "c")
    [[a, b]] = llm.complete(["one two"], max_tokens=4, n=2, top_logprobs=3)
    assert a.text == b.text and a.top_logprobs is not None and len(a.top_logprobs[0]) == 3
    assert all(v <= 0 for v in a.top_logprobs[0].values())
    long_prompt = "one two three four five six seven eight nine ten " * 20     # longer than the 64-token context
    assert len(llm.complete([long_prompt], max_tokens=4)[0][0].text) >= 0
    with pytest.raises(ConfigError, match="leaves no room"):
        llm.complete(["one"], max_tokens=64)
    sampled = llm.complete(["one two", "three"], max_tokens=4, temperature=1.0, n=3, seed=0)
    assert [len(r) for r in sampled] == [3, 3]
    assert LocalLLM(model, tok, cache_dir=tmp_path / "c").complete(["one two"], max_tokens=4, n=2, top_logprobs=3) \
        == [[a, b]]
