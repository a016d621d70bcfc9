"""Benchmark harness (multiple choice == direct log-likelihoods, exact match, pass@k) and the code sandbox."""

from __future__ import annotations

import json
import math
import socket
import threading
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError, DataError
from lmstack.eval.harness import TaskConfig, extract_answer, load_task, run_task
from lmstack.eval.llm import Completion
from lmstack.eval.sandbox import pass_at_k, run_code

CORPUS = ("a man is sitting on a roof. he starts pulling up roofing on a roof. the woman plays the violin. "
          "people are standing in a field and the dog runs after the ball. ") * 3


@pytest.fixture(scope="module")
def tiny_lm():
    from lmstack.model import build_model, preset
    from lmstack.tokenizer import train_bpe

    tok = train_bpe([CORPUS], vocab_size=320)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=1024))
    return model.eval(), tok


@torch.no_grad()
def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[:len(ctx)] == ctx
    x = torch.tensor([whole])
    logp = F.log_softmax(model(x[:, :-1]).float(), -1)[0].gather(-1, x[0, 1:, None])[:, 0]
    return float(logp[len(ctx) - 1:].sum())


def test_multiple_choice_equals_direct_loglikelihood(tiny_lm, shared_data):
    model, tok = tiny_lm
    task = TaskConfig(name="hs", kind="multiple_choice", format="hellaswag", path="eval/hellaswag_val_subset1000.jsonl",
                      limit=6, num_fewshot=1, batch_size=5)
    res = run_task(task, model=model, tokenizer=tok, data_dir=shared_data)
    from lmstack.eval.harness import fewshot_prefix, load_docs

    docs, pool = load_docs(task, shared_data)
    acc = acc_norm = 0
    for i, (doc, rec) in enumerate(zip(docs, res.records)):
        ctx = fewshot_prefix(task, pool, i) + doc["query"]
        assert ctx.count("\n\n") == 1                                       # one shot, then the query
        direct = [direct_loglikelihood(model, tok, ctx, " " + c) for c in doc["choices"]]
        assert rec["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
        acc += max(range(4), key=lambda j: direct[j]) == doc["gold"]
        acc_norm += max(range(4), key=lambda j: direct[j] / len(doc["choices"][j])) == doc["gold"]
    assert res.metrics["acc"] == pytest.approx(acc / 6) and res.metrics["acc_norm"] == pytest.approx(acc_norm / 6)


def test_generic_multiple_choice_file(tiny_lm, tmp_path):
    model, tok = tiny_lm
    rows = [{"question": "the dog runs after the", "choices": ["ball.", "violin."], "label": "ball."},
            {"question": "the woman plays the", "choices": ["roof.", "violin."], "label": 1}]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    task = TaskConfig(name="mc", kind="multiple_choice", path=str(path))
    res = run_task(task, model=model, tokenizer=tok)
    assert [r["gold"] for r in res.records] == [0, 1] and res.n == 2


class Scripted:
    name = "scripted"

    def __init__(self, fn):
        self.fn = fn

    def complete(self, prompts, *, max_tokens=256, temperature=0.0, n=1, stop=(), top_logprobs=0, seed=None):
        return [[Completion(self.fn(p, k)) for k in range(n)] for p in prompts]


def test_generate_exact_match_with_extraction(tmp_path):
    rows = [{"question": "2+2?", "answer": "two and two\n#### 4"},
            {"question": "1,000+1?", "answer": "so\n#### 1,001"},
            {"question": "3*3?", "answer": "#### 9"}]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    replies = {"2+2?": "2 and 2 make 4.\n#### 4", "1,000+1?": "It is 1001 I think", "3*3?": "#### 8"}
    llm = Scripted(lambda p, k: replies[p.rsplit("Question: ", 1)[1].split("\n", 1)[0]])
    task = TaskConfig(name="gsm", kind="generate", format="gsm8k", path=str(path), num_fewshot=1)
    res = run_task(task, llm=llm)
    assert res.metrics["exact_match"] == pytest.approx(1 / 3)
    assert res.metrics["exact_match_flexible"] == pytest.approx(2 / 3)
    assert extract_answer("The answer is $1,234.", r"#### (\-?[0-9\.\,]+)") == (None, "1234")


def test_pass_at_k_estimator_matches_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 5)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(eval_data):
    task = load_task("humaneval")
    task.limit, task.n_samples, task.k = 6, 2, [1, 2]
    from lmstack.eval.harness import load_docs

    docs, _ = load_docs(task, eval_data)
    assert len(docs) >= 4
    samples = {d["id"]: [d["canonical_solution"], "    return None\n"] for d in docs}
    res = run_task(task, data_dir=eval_data, samples=samples)
    assert res.metrics["pass@1"] == pytest.approx(0.5) and res.metrics["pass@2"] == pytest.approx(1.0)
    assert all(r["statuses"][0] == "passed" and r["statuses"][1] == "failed" for r in res.records)


def test_perplexity_task_and_task_errors(tiny_lm, tmp_path):
    model, tok = tiny_lm
    (tmp_path / "held.txt").write_text("a man is sitting on a roof.\n\nthe dog runs after the ball.\n", encoding="utf-8")
    res = run_task(TaskConfig(name="ppl", kind="perplexity", format="text", path="held.txt"), model=model,
                   tokenizer=tok, data_dir=tmp_path)
    assert res.n == 2 and res.metrics["perplexity"] > 1 and res.metrics["bits_per_byte"] > 0
    with pytest.raises(ConfigError, match="field 'kind'"):
        TaskConfig(name="x", kind="essay", path="a")
    with pytest.raises(DataError, match="no such data file"):
        run_task(TaskConfig(name="x", kind="perplexity", path="missing.jsonl"), model=model, tokenizer=tok,
                 data_dir=tmp_path)
    with pytest.raises(ConfigError, match="no task 'nope'"):
        load_task("nope")
    with pytest.raises(DataError, match="row 0"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"q": 1}\n', encoding="utf-8")
        run_task(TaskConfig(name="b", kind="multiple_choice", format="hellaswag", path=str(bad)), model=model,
                 tokenizer=tok)


# ------------------------------------------------------------------------------------------------- sandbox

def test_sandbox_runs_good_code_and_reports_failures():
    ok = run_code("open('scratch.txt', 'w').write('x'); print(open('scratch.txt').read())")
    assert ok.passed and ok.stdout.strip() == "x"
    assert run_code("assert 1 == 2").status == "failed"


def test_sandbox_blocks_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    t = threading.Thread(target=lambda: got.append(_accept(server)))
    t.start()
    snippets = [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
                "import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)"]
    results = [run_code(code, timeout_s=5) for code in snippets]
    t.join()
    server.close()
    assert got == [None]                                   # nothing ever connected
    assert all(r.status == "blocked" for r in results), [r.stderr[-200:] for r in results]


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_sandbox_blocks_writes_outside_and_processes(tmp_path):
    target = tmp_path / "escaped.txt"
    hostile = [f"open({str(target)!r}, 'w').write('pwned')",
               f"import os; fd = os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY); os.write(fd, b'x')",
               f"import shutil; shutil.copyfile('main.py', {str(target)!r})",
               f"import os; os.rename('main.py', {str(target)!r})",
               f"import os; os.system('touch {target}')",
               f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
               "import os; os.fork()",
               f"import ctypes; ctypes.CDLL(None).system(b'touch {target}')"]
    for code in hostile:
        r = run_code(code)
        assert r.status == "blocked", (code, r.status, r.stderr[-300:])
    assert not target.exists()


def test_sandbox_stops_runaway_time_and_memory():
    assert run_code("while True:\n    pass", timeout_s=1).status == "timeout"
    assert run_code("import time\ntime.sleep(30)", timeout_s=1).status == "timeout"
    assert run_code("x = bytearray(4 * 1024 ** 3)", memory_mb=256).status == "memory"
    assert run_code("x = [0] * (10 ** 9)", memory_mb=256).status == "memory"
    assert math.isfinite(run_code("print(1)").seconds)
