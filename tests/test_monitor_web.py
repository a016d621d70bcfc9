"""The feedback router in a bare FastAPI app (fastapi's TestClient), over both stores: thumbs, comments and
pairwise choices recorded; unknown ids and malformed bodies answered with OpenAI's error body while the app
keeps serving; the review and pairwise pages and the JSON they read (order randomised, model names hidden)."""

from __future__ import annotations

import json

import pytest

from lmstack.monitor.store import Interaction, open_store

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

pytest_plugins = ("monitor_pg",)   # the store_url fixture: SQLite and PostgreSQL

T0 = 1_780_000_000.0


@pytest.fixture
def served(store_url):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lmstack.monitor.web import feedback_router

    store = open_store(store_url)
    app = FastAPI()
    app.include_router(feedback_router(store, review_sample=5))
    with TestClient(app) as client:
        yield client, store
    store.close()


def _error_shape(r, status, param, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)
    return body["error"]["message"]


def test_thumbs_and_comments_are_recorded(served):
    client, store = served
    i = store.log(Interaction(id="", time=T0, model="m", input="hi", output="hello"))
    r = client.post("/v1/feedback", json={"interaction_id": i, "kind": "thumb", "value": 1, "user": "ann"})
    assert r.status_code == 200 and r.json() == {"object": "feedback", "interaction_id": i, "kind": "thumb"}
    assert client.post("/v1/feedback", json={"interaction_id": i, "kind": "comment", "text": "ok"}).status_code == 200
    assert [(f.kind, f.value, f.text, f.user) for f in store.feedback(i)] == [("thumb", 1.0, None, "ann"),
                                                                               ("comment", None, "ok", None)]


def test_bad_feedback_gets_openai_errors_and_the_app_keeps_serving(served):
    client, store = served
    i = store.log(Interaction(id="", time=T0, model="m", input="hi", output="hello"))
    msg = _error_shape(client.post("/v1/feedback", json={"interaction_id": "nope", "kind": "thumb", "value": 1}),
                       404, "interaction_id", "interaction_not_found")
    assert msg.startswith("feedback: 'interaction_id' 'nope' is not a logged interaction")
    _error_shape(client.post("/v1/feedback", content=b"{not json"), 400, None, "invalid_json")
    _error_shape(client.post("/v1/feedback", content=b"\xff\xfe"), 400, None, "invalid_json")
    msg = _error_shape(client.post("/v1/feedback", json={"interaction_id": i, "kind": "thumb", "value": 5}),
                       400, "value", "invalid_parameter")
    assert "'value' of a thumb must be 1 (up) or -1 (down), got 5" in msg
    _error_shape(client.post("/v1/feedback", json={"interaction_id": i, "value": 1}), 400, "kind", "invalid_parameter")
    _error_shape(client.post("/v1/feedback", json=[1]), 400, None, "invalid_parameter")
    _error_shape(client.post("/v1/feedback", json={"interaction_id": i, "kind": "pairwise", "value": 1,
                                                   "other_id": "gone"}), 404, "other_id", "interaction_not_found")
    assert store.feedback() == []
    assert client.post("/v1/feedback", json={"interaction_id": i, "kind": "thumb", "value": -1}).status_code == 200
    assert len(store.feedback()) == 1


def test_interactions_sample_json(served):
    client, store = served
    store.log_many([Interaction(id=f"r{k}", time=T0 + k, model="m", input=f"q{k}", output=f"a{k}",
                                embedding=[1.0, 2.0]) for k in range(8)])
    r = client.get("/v1/interactions", params={"sample": 3, "seed": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["seed"] == 4 and len(body["data"]) == 3
    assert "embedding" not in body["data"][0] and body["data"][0]["input"].startswith("q")
    assert body == client.get("/v1/interactions", params={"sample": 3, "seed": 4}).json()   # same seed, same rows
    assert len(client.get("/v1/interactions").json()["data"]) == 5                         # the router's default
    client.post("/v1/feedback", json={"interaction_id": "r0", "kind": "thumb", "value": 1})
    left = client.get("/v1/interactions", params={"sample": 50, "unreviewed": "true"}).json()["data"]
    assert sorted(d["id"] for d in left) == [f"r{k}" for k in range(1, 8)]
    _error_shape(client.get("/v1/interactions", params={"sample": "many"}), 400, "sample", "invalid_parameter")
    _error_shape(client.get("/v1/interactions", params={"sample": 0}), 400, "sample", "invalid_parameter")
    _error_shape(client.get("/v1/interactions", params={"stratify_by": "input"}), 400, "stratify_by",
                 "invalid_parameter")
    _error_shape(client.get("/v1/interactions", params={"unreviewed": "maybe"}), 400, "unreviewed",
                 "invalid_parameter")


def test_pairwise_pair_is_shuffled_blind_and_its_choice_recorded(served):
    client, store = served
    _error_shape(client.get("/v1/interactions/pair"), 404, None, "no_pair")
    store.log(Interaction(id="sft", time=T0, model="secret-sft", input="tell a joke", output="A pun."))
    store.log(Interaction(id="dpo", time=T0 + 1, model="secret-dpo", input="tell a joke", output="A better pun."))
    store.log(Interaction(id="solo", time=T0 + 2, model="secret-sft", input="lonely", output="only one answer"))
    orders = set()
    for seed in range(12):
        r = client.get("/v1/interactions/pair", params={"seed": seed})
        assert r.status_code == 200
        body = r.json()
        assert body["prompt"] == "tell a joke" and "secret" not in json.dumps(body) and "model" not in body
        orders.add(tuple(a["id"] for a in body["answers"]))
    assert orders == {("sft", "dpo"), ("dpo", "sft")}
    assert client.get("/v1/interactions/pair", params={"seed": 3}).json() == \
        client.get("/v1/interactions/pair", params={"seed": 3}).json()
    first, second = body["answers"]
    r = client.post("/v1/feedback", json={"interaction_id": first["id"], "other_id": second["id"],
                                          "kind": "pairwise", "value": -1})
    assert r.status_code == 200
    (fb,) = store.feedback()
    assert (fb.kind, fb.interaction_id, fb.other_id, fb.value) == ("pairwise", first["id"], second["id"], -1.0)
    msg = _error_shape(client.post("/v1/feedback", json={"interaction_id": "sft", "other_id": "solo",
                                                         "kind": "pairwise", "value": 1}),
                       400, "other_id", "invalid_parameter")
    assert "two answers to one prompt" in msg


def test_pair_prefers_different_models(served):
    client, store = served
    store.log_many([Interaction(id="a1", time=T0, model="a", input="q", output="x"),
                    Interaction(id="a2", time=T0 + 1, model="a", input="q", output="y"),
                    Interaction(id="b1", time=T0 + 2, model="b", input="q", output="z")])
    for seed in range(10):
        ids = {a["id"] for a in client.get("/v1/interactions/pair", params={"seed": seed}).json()["answers"]}
        assert "b1" in ids and len(ids) == 2


def test_pair_window_leaves_old_interactions_out(store_url):
    import time

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lmstack.monitor.web import feedback_router

    store = open_store(store_url)
    now = time.time()
    store.log_many([Interaction(id="old1", time=now - 7200, model="a", input="old q", output="x"),
                    Interaction(id="old2", time=now - 7100, model="b", input="old q", output="y"),
                    Interaction(id="new1", time=now - 60, model="a", input="new q", output="x"),
                    Interaction(id="new2", time=now - 30, model="b", input="new q", output="y")])
    app = FastAPI()
    app.include_router(feedback_router(store, pair_window_s=3600))
    with TestClient(app) as client:
        for seed in range(6):
            body = client.get("/v1/interactions/pair", params={"seed": seed}).json()
            assert body["prompt"] == "new q"
    store.close()


def test_pages_are_plain_html_calling_relative_urls(served):
    client, _ = served
    review = client.get("/review")
    assert review.status_code == 200 and review.headers["content-type"].startswith("text/html")
    assert "fetch('v1/feedback'" in review.text and "v1/interactions?sample=5&unreviewed=true" in review.text
    assert "innerHTML" not in review.text     # text is shown through textContent only
    pairwise = client.get("/pairwise")
    assert pairwise.status_code == 200 and "v1/interactions/pair" in pairwise.text
    assert "kind: 'pairwise'" in pairwise.text and "innerHTML" not in pairwise.text


def test_router_mounts_under_a_prefix(store_url, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lmstack.monitor.web import feedback_router

    store = open_store(store_url)
    i = store.log(Interaction(id="", time=T0, model="m", input="hi", output="hello"))
    app = FastAPI()
    app.include_router(feedback_router(store), prefix="/monitor")
    with TestClient(app) as client:
        assert client.get("/monitor/review").status_code == 200
        assert client.post("/monitor/v1/feedback", json={"interaction_id": i, "kind": "thumb",
                                                         "value": 1}).status_code == 200
    store.close()


# ---------------------------------------------------------------------------------------------------- the pages' JS

_DOM_STUB = r"""
const calls = [], els = {};
function mk(tag) {
  return {tag, children: [], textContent: '', className: '', value: '', onclick: null,
          appendChild(c) { this.children.push(c); return c; }, append(...cs) { this.children.push(...cs); },
          replaceChildren() { this.children = []; }};
}
globalThis.document = {getElementById: id => els[id] || (els[id] = mk('div')), createElement: mk};
globalThis.localStorage = {getItem: () => 'k3y', setItem: () => {}};
const reply = j => ({ok: true, status: 200, json: async () => j});
globalThis.fetch = async (url, opts) => {
  calls.push({url, method: (opts && opts.method) || 'GET', auth: opts.headers.Authorization,
              body: opts.body ? JSON.parse(opts.body) : null});
  if (url.startsWith('v1/interactions/pair'))
    return reply({prompt: 'q', messages: null, answers: [{id: 'x1', output: 'one'}, {id: 'x2', output: 'two'}]});
  if (url.startsWith('v1/interactions'))
    return reply({data: [{id: 'r1', time: 1780000000, model: 'm', model_version: '', input: 'hi', output: 'yo'}]});
  return reply({object: 'feedback'});
};
const tick = () => new Promise(r => setTimeout(r, 10));
"""


def _run_page(page: str, actions: str) -> dict:
    import re
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: the pages' JavaScript is not run")
    script = re.search(r"<script>(.*)</script>", page, re.DOTALL).group(1)
    code = _DOM_STUB + script + "\n(async () => { await tick();\n" + actions + \
        "\nawait tick(); console.log(JSON.stringify({calls, els}, (k, v) => k === 'onclick' ? undefined : v)); })();"
    got = subprocess.run([node, "-e", code], check=False, capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def test_review_page_script_posts_thumbs_and_comments():
    from lmstack.monitor.web import REVIEW_PAGE

    out = _run_page(REVIEW_PAGE.replace("__SAMPLE__", "7"), """
      const card = els.list.children[0];
      card.children.find(c => c.textContent.includes('bad')).onclick();
      await tick();
      card.children.find(c => c.tag === 'textarea').value = 'too terse';
      card.children.find(c => c.textContent === 'Send comment').onclick();""")
    calls = out["calls"]
    assert calls[0] == {"url": "v1/interactions?sample=7&unreviewed=true", "method": "GET", "auth": "Bearer k3y",
                        "body": None}
    assert [c["body"] for c in calls[1:]] == [{"interaction_id": "r1", "kind": "thumb", "value": -1},
                                              {"interaction_id": "r1", "kind": "comment", "text": "too terse"}]
    assert all(c["url"] == "v1/feedback" and c["method"] == "POST" for c in calls[1:])
    card = out["els"]["list"]["children"][0]
    assert [c["textContent"] for c in card["children"] if c["tag"] == "pre"] == ["hi", "yo"]
    assert out["els"]["top"]["textContent"] == "1 interactions"


def test_pairwise_page_script_records_the_choice_and_loads_the_next():
    from lmstack.monitor.web import PAIRWISE_PAGE

    out = _run_page(PAIRWISE_PAGE, "els.second.onclick();")
    calls = out["calls"]
    assert [c["url"] for c in calls] == ["v1/interactions/pair", "v1/feedback", "v1/interactions/pair"]
    assert calls[1]["body"] == {"interaction_id": "x1", "other_id": "x2", "kind": "pairwise", "value": -1}
    assert (out["els"]["a1"]["textContent"], out["els"]["a2"]["textContent"]) == ("one", "two")
    assert [c["textContent"] for c in out["els"]["prompt"]["children"]] == ["q"]
