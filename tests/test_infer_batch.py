"""A running batch that sequences join and leave between steps (lmstack.infer.batch): every sequence gets
the ids it gets alone (greedy, and seeded sampling), whatever runs beside it and whenever it is admitted;
retiring frees the slot; the cache never outgrows its columns."""

from __future__ import annotations

import pytest
import torch
from test_infer import ByteTok, V, tiny

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer import GenerationConfig, generate_result
from lmstack.infer.batch import Batch


@pytest.fixture(scope="module", params=["rope", "learned", "alibi"])
def model(request):
    return tiny(request.param)


def alone(model, prompt, cfg):
    res = generate_result(model, [prompt], cfg)
    return res.new_tokens(0), res.finish_reasons[0]


def run(batch: Batch, schedule: dict[int, list[tuple[list[int], GenerationConfig]]], steps: int = 200):
    """Step the batch, admitting schedule[i] before step i; returns {seq_id: (prompt, config)} and the
    events seen per sequence."""
    admitted, seen = {}, {}
    for i in range(steps):
        for prompt, cfg in schedule.get(i, []):
            admitted[batch.add(prompt, cfg)] = (prompt, cfg)
        for seq_id, tok, finished in batch.step():
            seen.setdefault(seq_id, []).append((tok, finished))
        if not batch.running and i > max(schedule):
            break
    return admitted, seen


def test_admitting_mid_generation_gives_each_sequence_its_ids_alone(model):
    greedy = GenerationConfig(max_new_tokens=12)
    free = alone(model, [3, 4, 5], GenerationConfig(max_new_tokens=10))[0]
    schedule = {
        0: [([12, 13], greedy)],                                             # starts alone
        3: [([5, 6, 7, 8, 9, 10, 11, 20, 21], GenerationConfig(max_new_tokens=9))],   # longer than the cursor
        5: [([3, 4, 5], GenerationConfig(max_new_tokens=10, eos_token_id=free[4])),   # its own stop id
            ([14, 15, 16, 17], GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.9, top_k=20,
                                                seed=3))],                    # sampled with its own seed
    }
    batch = Batch(model, slots=4)
    admitted, seen = run(batch, schedule)
    assert len(admitted) == 4 and not batch.running
    for seq_id, (prompt, cfg) in admitted.items():
        want, reason = alone(model, prompt, cfg)
        seq = batch.sequences[seq_id]
        assert seq.tokens == want and seq.finish_reason == reason, (prompt, cfg)
        assert [t for t, _ in seen[seq_id]] == want                          # step() reported each token once
        assert [f for _, f in seen[seq_id]] == [False] * (len(want) - 1) + [True]
    assert batch.sequences[2].finish_reason == "stop" and len(batch.sequences[2].tokens) == 5
    # a different seed in the batch gives different draws: the sampled row really samples
    other = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.9, top_k=20, seed=4)
    assert alone(model, [14, 15, 16, 17], other)[0] != batch.sequences[3].tokens


def test_retiring_frees_the_slot_for_the_next_sequence(model):
    cfg = GenerationConfig(max_new_tokens=6)
    batch = Batch(model, slots=1)
    a = batch.add([12, 13], cfg)
    with pytest.raises(LmstackError, match="full"):
        batch.add([5, 6], cfg)
    batch.step(), batch.step()
    dropped = batch.retire(a)                                                # cancelled mid-generation
    assert dropped.finish_reason is None and dropped.tokens == alone(model, [12, 13], cfg)[0][:2]
    assert batch.free_slots == 1 and batch.running == []
    b = batch.add([5, 6, 7], cfg)                                            # reuses the slot
    while batch.running:
        batch.step()
    assert batch.retire(b).tokens == alone(model, [5, 6, 7], cfg)[0]
    with pytest.raises(LmstackError, match="no sequence"):
        batch.retire(b)


def test_a_long_running_batch_drops_old_columns_and_stays_exact(model):
    """max_len=20 columns; sequences keep arriving, so the cursor passes 20 several times."""
    batch = Batch(model, slots=2, max_len=20)
    prompts = [[5, 6, 7], [12, 13, 14, 15], [8, 9], [16, 17, 18, 19, 20], [21, 22, 23]]
    cfgs = [GenerationConfig(max_new_tokens=n) for n in (15, 9, 17, 12, 14)]
    queue = list(zip(prompts, cfgs))
    ids = {}
    for _ in range(200):
        while queue and batch.free_slots:
            prompt, cfg = queue.pop(0)
            ids[batch.add(prompt, cfg)] = (prompt, cfg)
        events = batch.step()
        for seq_id, _, finished in events:
            if finished:
                prompt, cfg = ids[seq_id]
                assert batch.retire(seq_id).tokens == alone(model, prompt, cfg)[0]
        if not queue and not batch.running:
            break
    assert len(ids) == 5 and batch.free_slots == 2 and batch.cache.max_len == 20


def test_retiring_moves_the_last_row_and_forwards_only_occupied_rows(model):
    """Rows retire out of order (the first one cancelled while the others run): the last occupied row moves
    into the freed one, every survivor still gets its ids alone, and each decode forward has exactly as many
    rows as sequences are in the batch (an 8-slot batch with one sequence forwards one row)."""
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(args[0].shape[0]), with_kwargs=True)
    try:
        batch = Batch(model, slots=8)
        jobs = [([12, 13], 14), ([5, 6, 7, 8], 5), ([9, 10, 11], 9), ([16, 17], 11)]
        ids = {batch.add(p, GenerationConfig(max_new_tokens=n)): (p, n) for p, n in jobs}
        first = next(iter(ids))
        rows_seen.clear()
        batch.step(), batch.step()
        assert rows_seen == [4, 4]
        cancelled = batch.retire(first)                                     # row 0 freed; row 3 moves there
        assert cancelled.tokens == alone(model, [12, 13], GenerationConfig(max_new_tokens=14))[0][:2]
        rows_seen.clear()
        done = {}
        while batch.running:
            occupied = batch.occupied
            for seq_id, _, finished in batch.step():
                if finished:
                    done[seq_id] = batch.retire(seq_id).tokens
            assert rows_seen[-1] <= occupied                                # no forward of an idle row
        for seq_id, tokens in done.items():
            prompt, n = ids[seq_id]
            assert tokens == alone(model, prompt, GenerationConfig(max_new_tokens=n))[0]
        assert len(done) == 3 and sorted(set(rows_seen)) == [1, 2, 3]
        assert batch.cache.pos == 0                                         # empty again: the cursor reset
        rows_seen.clear()
        lone = batch.add([12, 13], GenerationConfig(max_new_tokens=4))
        while batch.running:
            batch.step()
        assert rows_seen == [1, 1, 1, 1]                       # its prefill, 3 decode steps: one row of 8 slots
        assert batch.retire(lone).tokens == alone(model, [12, 13], GenerationConfig(max_new_tokens=4))[0]
    finally:
        hook.remove()


def test_chunked_prefill_keeps_decoding_and_stays_exact(model):
    """prefill_chunk=4: a 21-token prompt takes 6 steps to come in; the sequence already running gets a token in
    every one of them; every sequence still equals its output alone."""
    batch = Batch(model, slots=3, prefill_chunk=4)
    short = batch.add([12, 13], GenerationConfig(max_new_tokens=12))
    [(seq_id, first, _)] = batch.step()              # its prefill (2 ids) and, in the same step, its first token
    got = {short: [first]}
    long_prompt = [5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]
    long = batch.add(long_prompt, GenerationConfig(max_new_tokens=5))
    got[long] = []
    steps_until_long = 0
    while batch.running:
        events = batch.step()
        ids = [e[0] for e in events]
        if not got[long]:
            steps_until_long += 1
            assert short in ids or batch.sequences[short].finished          # never stalled by the long prefill
        for seq_id, tok, _ in events:
            got[seq_id].append(tok)
    assert steps_until_long == 6                     # ceil(21 / 4) chunks, the last one with its first token
    assert got[short] == alone(model, [12, 13], GenerationConfig(max_new_tokens=12))[0]
    assert got[long] == alone(model, long_prompt, GenerationConfig(max_new_tokens=5))[0]
    assert batch.stats["prefill_tokens"] == 2 + 21


def test_prompts_arriving_together_are_prefilled_in_one_forward_exactly(model):
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    try:
        batch = Batch(model, slots=4, prefill_chunk=64)
        jobs = [([12, 13], 7), ([5, 6, 7, 8, 9, 10, 11], 5), ([9, 10, 11], 9), ([16, 17, 18, 19], 6)]
        ids = {batch.add(p, GenerationConfig(max_new_tokens=n)): (p, n) for p, n in jobs}
        first = batch.step()
        assert shapes[0] == (4, 7) and shapes[1] == (4, 1)                # one padded prefill, one decode step
        assert [seq for seq, _, _ in first] == list(ids)                   # every prompt got its first token
        while batch.running:
            batch.step()
        for seq_id, (prompt, n) in ids.items():
            assert batch.retire(seq_id).tokens == alone(model, prompt, GenerationConfig(max_new_tokens=n))[0]
    finally:
        hook.remove()


def test_prefix_cache_reuses_a_shared_prefix_exactly(model):
    system = list(range(3, 3 + 35))                 # 35 shared ids: two whole 16-id blocks are reusable
    batch = Batch(model, slots=2, prefix_cache_tokens=200)
    outs = {}
    for tail in ([40, 41, 42], [43, 44], [40, 41, 42]):
        seq = batch.add(system + tail, GenerationConfig(max_new_tokens=6))
        while batch.running:
            batch.step()
        outs[tuple(tail), seq] = batch.retire(seq).tokens
    for (tail, _), tokens in outs.items():
        assert tokens == alone(model, system + list(tail), GenerationConfig(max_new_tokens=6))[0]
    assert batch.stats["prefix_hits"] == 2 and batch.stats["prefix_tokens_reused"] == 64
    assert batch.stats["prefill_tokens"] == 38 + (37 - 32) + (38 - 32)
    small = Batch(model, slots=1, prefix_cache_tokens=40)   # room for one 38-id prefill: the older one goes
    for tail in ([40, 41, 42], [50, 51, 52]):
        other = [(i * 7) % 50 + 5 for i in range(35)]
        seq = small.add(other + tail if tail[0] == 50 else system + tail, GenerationConfig(max_new_tokens=1))
        while small.running:
            small.step()
        small.retire(seq)
    assert small.prefix_cache_held == 38
    seq = small.add(system + [40, 41, 42], GenerationConfig(max_new_tokens=1))   # evicted: computed again
    assert small.stats["prefix_hits"] == 0


def test_bad_input_is_refused():
    model = tiny("rope")
    batch = Batch(model, slots=2)
    with pytest.raises(ConfigError, match="num_beams"):
        batch.add([1, 2], GenerationConfig(num_beams=2))
    with pytest.raises(ConfigError, match="prompt_lookup"):
        batch.add([1, 2], GenerationConfig(prompt_lookup_num_tokens=2))
    with pytest.raises(ConfigError, match="tokenizer"):
        batch.add([1, 2], GenerationConfig(stop_strings=["x"]))
    with pytest.raises(LmstackError, match="empty prompt"):
        batch.add([], GenerationConfig())
    with pytest.raises(LmstackError, match="outside the model's vocabulary"):
        batch.add([1, V], GenerationConfig())
    assert batch.free_slots == 2                                             # nothing half-admitted
    empty = batch.add([1, 2], GenerationConfig(max_new_tokens=0))           # finished on arrival
    assert batch.sequences[empty].finish_reason == "length" and batch.step() == []
    with pytest.raises(ConfigError, match="slots"):
        Batch(model, slots=0)


def test_a_prefix_tuned_model_runs_in_generate_and_in_a_batch():
    """The prefix enters through Attention.prefix_kv, so the engine needs nothing special: cached decoding
    equals recomputation, and a Batch gives each sequence its ids alone."""
    from lmstack.finetune.prefix import PrefixConfig, add_prefix, remove_prefix

    model = tiny("rope")
    prompts = [[12, 13], [5, 6, 7, 8]]
    cfg = GenerationConfig(max_new_tokens=10)
    plain = [alone(model, p, cfg)[0] for p in prompts]
    add_prefix(model, PrefixConfig(n_prefix=3, reparam=False, init_std=3.0))
    cached = generate_result(model, prompts, cfg)
    assert torch.equal(cached.sequences, generate_result(model, prompts, cfg.replace(use_cache=False)).sequences)
    tuned = [cached.new_tokens(r) for r in range(2)]
    assert tuned != plain                                                   # the prefix changes the output
    batch = Batch(model, slots=2)
    first = batch.add(prompts[0], cfg)
    batch.step(), batch.step()
    second = batch.add(prompts[1], cfg)
    while batch.running:
        batch.step()
    assert [batch.sequences[first].tokens, batch.sequences[second].tokens] == [alone(model, p, cfg)[0] for p in prompts]
    assert batch.sequences[first].tokens == tuned[0]
    remove_prefix(model)
    assert [alone(model, p, cfg)[0] for p in prompts] == plain


def test_stop_strings_are_per_sequence(model):
    free = alone(model, [5, 6, 7], GenerationConfig(max_new_tokens=12))[0]
    text = "".join(chr(97 + t % 26) for t in free)                        # ByteTok's bytes
    stop = GenerationConfig(max_new_tokens=12, stop_strings=[text[3:5]])
    batch = Batch(model, slots=2, tokenizer=ByteTok())
    a = batch.add([5, 6, 7], stop)
    b = batch.add([5, 6, 7], GenerationConfig(max_new_tokens=12))            # same prompt, no stop string
    while batch.running:
        batch.step()
    want = generate_result(model, [[5, 6, 7]], stop, tokenizer=ByteTok())
    assert batch.sequences[a].tokens == want.new_tokens(0) == free[:text.find(text[3:5]) + 2]
    assert batch.sequences[a].finish_reason == "stop"
    assert batch.sequences[b].tokens == free and batch.sequences[b].finish_reason == "length"


def test_kv_cache_row_operations():
    from lmstack.model import KVCache

    cache = KVCache(n_layer=1, batch_size=2, n_kv_head=1, max_len=6, head_dim=1)
    k = torch.arange(1.0, 5.0).view(2, 1, 2, 1)                            # rows [1, 2] and [3, 4]
    cache.update(0, k, -k)
    cache.advance(2)
    cache.pad_left(3)                                                       # content moves right, front is padding
    assert cache.pos == 5 and cache.k[0][:, 0, 3:5, 0].tolist() == [[1, 2], [3, 4]]
    assert cache.mask[:, :5].tolist() == [[False] * 3 + [True] * 2] * 2
    one = KVCache(n_layer=1, batch_size=1, n_kv_head=1, max_len=4, head_dim=1)
    one.update(0, torch.tensor([[[[7.0], [8.0]]]]), torch.tensor([[[[-7.0], [-8.0]]]]))
    one.advance(2)
    cache.write_row(1, one, 3)                                              # ends at the cursor
    assert cache.k[0][1, 0, 3:5, 0].tolist() == [7, 8] and cache.v[0][1, 0, 3:5, 0].tolist() == [-7, -8]
    assert cache.mask[1, :5].tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError):
        cache.write_row(0, one, 4)                                          # would pass the cursor
    with pytest.raises(ValueError):
        cache.pad_left(2)                                                   # 5 + 2 > 6 columns
    cache.clear_row(0)
    assert not cache.mask[0].any() and cache.mask[1, 3:5].all()
