"""The feedback endpoints and review pages, as a FastAPI router a server mounts next to its API.

    app.include_router(feedback_router(store))

Routes:

- ``POST /v1/feedback``: ``{"interaction_id", "kind": "thumb"|"comment"|"pairwise", "value", "text",
  "other_id", "user"}`` (see :class:`lmstack.monitor.store.Feedback`); an unknown interaction is 404, a
  malformed body 400, both with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
- ``GET /v1/interactions?sample=N[&seed=S&model=M&stratify_by=F&unreviewed=true]``: a review sample as JSON
  (every field but the embedding).
- ``GET /v1/interactions/pair[?seed=S]``: one prompt and two different answers to it (from different models,
  versions or arms where the log has them), in random order and without model names.
- ``GET /review``: a page listing a sample of not-yet-judged interactions with thumbs and a comment box.
- ``GET /pairwise``: a page showing two answers to one prompt and recording which is better.

The pages are plain HTML and JavaScript (no build step); they call the JSON routes by relative URLs, so the
router works under any prefix, and send the API key typed into them as the bearer token when the server needs
one. Store calls run in the server's thread pool (the stores keep one connection per thread).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (``request: Request``) at
# runtime, and Request is imported inside feedback_router, where a string annotation could not be resolved
import json
import random
import time
from typing import Any

from lmstack.errors import LmstackError
from lmstack.monitor.feedback import parse_feedback, prompt_of
from lmstack.monitor.store import FieldError, Interaction, UnknownInteraction, interaction_to_dict

MAX_SAMPLE = 500


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


def _public(row: Interaction) -> dict[str, Any]:
    d = interaction_to_dict(row)
    d.pop("embedding")
    return d


def _int_param(query: Any, name: str, default: int | None, lo: int, hi: int) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise FieldError(f"'{name}' must be an integer, got {text!r:.40}", name) from None
    if not lo <= value <= hi:
        raise FieldError(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def pick_pair(store: Any, rng: random.Random, since: float | None = None) -> tuple[Interaction, Interaction] | None:
    """Two interactions with one input and different outputs, preferring ones served by different models,
    versions or arms; in random order. None when the log has no such prompt."""
    inputs = store.inputs_with_alternatives(since=since)
    if not inputs:
        return None
    rows = store.rows(input=rng.choice(inputs), since=since)
    by_output: dict[str, Interaction] = {}
    for r in rows:
        by_output.setdefault(r.output, r)
    distinct = list(by_output.values())
    couples = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]]
    apart = [(a, b) for a, b in couples if (a.model, a.model_version, a.arm) != (b.model, b.model_version, b.arm)]
    a, b = rng.choice(apart or couples)
    return (a, b) if rng.random() < 0.5 else (b, a)


def feedback_router(store: Any, review_sample: int = 20, pair_window_s: float | None = None) -> Any:
    """The router of the module docstring's routes over ``store`` (a :class:`~lmstack.monitor.store.LogStore`);
    ``review_sample``: how many interactions the review page asks for; ``pair_window_s``: the pairwise page
    draws from the interactions of this many last seconds (default: all; a bound keeps a big log's pair query
    short)."""
    from lmstack.extras import require

    require("fastapi", "the feedback endpoints (lmstack.monitor.web)")
    from fastapi import APIRouter, Request
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    def failed(e: LmstackError) -> Any:
        if isinstance(e, UnknownInteraction):
            return _error(404, str(e), e.field, "interaction_not_found")
        if isinstance(e, FieldError):
            return _error(400, str(e), e.field, "invalid_parameter")
        # the store itself failed (a PostgreSQL server gone, a lock held too long): not the client's fault
        return _error(503, str(e), None, "store_unavailable", "server_error")

    @router.post("/v1/feedback")
    async def post_feedback(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(400, f"the request body is not valid JSON ({e})", None, "invalid_json")
        try:
            fb = parse_feedback(body)
            await run_in_threadpool(store.add_feedback, fb)
        except LmstackError as e:
            return failed(e)
        return {"object": "feedback", "interaction_id": fb.interaction_id, "kind": fb.kind}

    @router.get("/v1/interactions")
    async def interactions(request: Request) -> Any:
        q = request.query_params
        try:
            n = _int_param(q, "sample", review_sample, 1, MAX_SAMPLE)
            seed = _int_param(q, "seed", None, 0, 2 ** 63 - 1)
            unreviewed = q.get("unreviewed", "false").lower()
            if unreviewed not in ("true", "false", "1", "0"):
                raise FieldError(f"'unreviewed' must be true or false, got {unreviewed!r:.20}", "unreviewed")
            seed = random.SystemRandom().randrange(2 ** 31) if seed is None else seed
            rows = await run_in_threadpool(store.sample, n, seed, model=q.get("model"),
                                           stratify_by=q.get("stratify_by"),
                                           without_feedback=unreviewed in ("true", "1"))
        except LmstackError as e:
            return failed(e)
        return {"object": "list", "seed": seed, "data": [_public(r) for r in rows]}

    @router.get("/v1/interactions/pair")
    async def pair(request: Request) -> Any:
        try:
            seed = _int_param(request.query_params, "seed", None, 0, 2 ** 63 - 1)
            rng = random.Random(seed) if seed is not None else random.Random(random.SystemRandom().random())
            since = None if pair_window_s is None else time.time() - pair_window_s
            got = await run_in_threadpool(pick_pair, store, rng, since)
        except LmstackError as e:
            return failed(e)
        if got is None:
            return _error(404, "no prompt in the log has two different answers yet", None, "no_pair")
        a, b = got
        prompt = prompt_of(a)
        return {"object": "pair", "prompt": prompt if isinstance(prompt, str) else None, "messages":
                None if isinstance(prompt, str) else prompt,
                "answers": [{"id": a.id, "output": a.output}, {"id": b.id, "output": b.output}]}

    @router.get("/review", response_class=HTMLResponse)
    async def review() -> Any:
        return HTMLResponse(REVIEW_PAGE.replace("__SAMPLE__", str(int(review_sample))))

    @router.get("/pairwise", response_class=HTMLResponse)
    async def pairwise() -> Any:
        return HTMLResponse(PAIRWISE_PAGE)

    return router


# ----------------------------------------------------------------------------------------------------
# the pages: text goes into the DOM through textContent only, never as HTML

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .75rem 1rem; margin: 1rem 0; }
.meta { color: #666; font-size: .85rem; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: .5rem; border-radius: 4px; margin: .4rem 0; }
button { margin-right: .4rem; } textarea { width: 100%; box-sizing: border-box; }
.status { color: #555; margin-left: .5rem; } .answers { display: flex; gap: 1rem; } .answers > div { flex: 1; }
"""

_COMMON_JS = """
const keyBox = document.getElementById('key');
keyBox.value = localStorage.getItem('lmstack_api_key') || '';
keyBox.onchange = () => localStorage.setItem('lmstack_api_key', keyBox.value);
function headers() {
  const h = {'Content-Type': 'application/json'};
  if (keyBox.value) h['Authorization'] = 'Bearer ' + keyBox.value;
  return h;
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
async function getJSON(url) {
  const r = await fetch(url, {headers: headers()});
  const j = await r.json();
  if (!r.ok) throw new Error((j.error && j.error.message) || ('HTTP ' + r.status));
  return j;
}
async function send(body, status) {
  status.textContent = 'saving...';
  try {
    const r = await fetch('v1/feedback', {method: 'POST', headers: headers(), body: JSON.stringify(body)});
    const j = await r.json();
    status.textContent = r.ok ? 'saved' : ((j.error && j.error.message) || ('HTTP ' + r.status));
    return r.ok;
  } catch (e) { status.textContent = String(e); return false; }
}
"""

REVIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmstack review</title><style>""" + _STYLE + """</style></head>
<body>
<h1>Review interactions</h1>
<p>A sample of interactions nobody has judged yet. Thumb each answer; add a comment where it helps.</p>
<p><label>API key (if the server needs one) <input id="key" type="password"></label>
<button id="more">New sample</button> <span id="top" class="status"></span></p>
<div id="list"></div>
<script>""" + _COMMON_JS + """
function card(row) {
  const c = el('div', null, 'card');
  const when = new Date(row.time * 1000).toISOString();
  c.appendChild(el('div', row.model + (row.model_version ? ' (' + row.model_version + ')' : '') + ' - ' + when,
                   'meta'));
  c.appendChild(el('div', 'Input', 'meta')); c.appendChild(el('pre', row.input));
  c.appendChild(el('div', 'Output', 'meta')); c.appendChild(el('pre', row.output));
  const status = el('span', '', 'status');
  const up = el('button', '\\u{1F44D} good'), down = el('button', '\\u{1F44E} bad');
  up.onclick = () => send({interaction_id: row.id, kind: 'thumb', value: 1}, status);
  down.onclick = () => send({interaction_id: row.id, kind: 'thumb', value: -1}, status);
  const text = el('textarea'); text.rows = 2; text.placeholder = 'comment (optional)';
  const post = el('button', 'Send comment');
  post.onclick = async () => {
    if (await send({interaction_id: row.id, kind: 'comment', text: text.value}, status)) text.value = '';
  };
  c.append(up, down, status, text, post);
  return c;
}
async function load() {
  const list = document.getElementById('list'), top = document.getElementById('top');
  list.replaceChildren(); top.textContent = 'loading...';
  try {
    const j = await getJSON('v1/interactions?sample=__SAMPLE__&unreviewed=true');
    j.data.forEach(row => list.appendChild(card(row)));
    top.textContent = j.data.length ? j.data.length + ' interactions' : 'nothing left to review';
  } catch (e) { top.textContent = String(e); }
}
document.getElementById('more').onclick = load;
load();
</script>
</body></html>
"""

PAIRWISE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmstack pairwise</title><style>""" + _STYLE + """</style></head>
<body>
<h1>Which answer is better?</h1>
<p>Two answers to one prompt, in random order; which model wrote which is hidden.</p>
<p><label>API key (if the server needs one) <input id="key" type="password"></label></p>
<div class="card"><div class="meta">Prompt</div><div id="prompt"></div>
<div class="answers"><div><div class="meta">Answer 1</div><pre id="a1"></pre></div>
<div><div class="meta">Answer 2</div><pre id="a2"></pre></div></div>
<button id="first">1 is better</button><button id="second">2 is better</button><button id="tie">Tie</button>
<button id="skip">Skip</button><span id="status" class="status"></span></div>
<script>""" + _COMMON_JS + """
let current = null;
async function next() {
  const status = document.getElementById('status'), prompt = document.getElementById('prompt');
  prompt.replaceChildren();
  try {
    current = await getJSON('v1/interactions/pair');
    if (current.messages) current.messages.forEach(m => prompt.appendChild(el('pre', m.role + ': ' + m.content)));
    else prompt.appendChild(el('pre', current.prompt));
    document.getElementById('a1').textContent = current.answers[0].output;
    document.getElementById('a2').textContent = current.answers[1].output;
    status.textContent = '';
  } catch (e) { current = null; status.textContent = String(e); }
}
async function choose(value) {
  if (!current) return;
  const ok = await send({interaction_id: current.answers[0].id, other_id: current.answers[1].id,
                         kind: 'pairwise', value: value}, document.getElementById('status'));
  if (ok) next();
}
document.getElementById('first').onclick = () => choose(1);
document.getElementById('second').onclick = () => choose(-1);
document.getElementById('tie').onclick = () => choose(0);
document.getElementById('skip').onclick = next;
next();
</script>
</body></html>
"""
