"""SFT data, the methods (gradients, frozen base, loss lowering), QLoRA quantization, prefix/adapter mechanics,
adapter save/load and bad input. Tiny models and tokenizers are built here; nothing is downloaded.

Stated tolerances: QLoRA's quantized base before training vs the fp32 model, on a tiny random model:
int8 max |logit diff| <= 0.02, NF4 and int4 <= 0.1 (logits have std ~1), and NF4's mean token KL <= 1e-3.
"""

from __future__ import annotations

import json

import pytest
from pathlib import Path
import torch

from lmstack.config import from_dict
from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.finetune import (AdapterConfig, LoraConfig, PrefixConfig, add_adapters, add_lora, add_prefix,
                              apply_method, quantize_base)
from lmstack.finetune.prefix import bake_prefix, remove_prefix
from lmstack.finetune.quant import QuantLinear, base_bytes, nf4_levels
from lmstack.finetune.run import FinetuneConfig, finetune, load_adapter, load_base, merge_run
from lmstack.finetune.sft import (SFTLoader, collate, encode_messages, load_examples, row_to_messages,
                                  split_heldout)
from lmstack.model import KVCache, build_model, preset, save

ROWS = [{"instruction": f"Explain what `mod{i}.func{i % 7}()` does.",
         "output": f"Return the {['sum', 'product', 'maximum', 'length', 'sorted copy'][i % 5]} of the values "
                   f"given in {['a list', 'a tuple', 'the iterable'][i % 3]}."} for i in range(120)]


@pytest.fixture(scope="module")
def tok():
    from lmstack.tokenizer import train_bpe

    return train_bpe([r["instruction"] + " " + r["output"] for r in ROWS], 300)


def _model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=96) | kw
    return build_model(preset("tiny", **cfg))


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    save(_model(tok), folder)
    tok.save(folder)
    data = tmp_path_factory.mktemp("data")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder, data / "train.jsonl"


# ---------------------------------------------------------------------------------------------------- data


def test_row_formats():
    alpaca = row_to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be terse."})
    assert alpaca == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sum\n\n1 2"},
                      {"role": "assistant", "content": "3"}]
    assert row_to_messages({"prompt": "p", "completion": "c"})[-1] == {"role": "assistant", "content": "c"}
    share = row_to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    assert [m["role"] for m in share] == ["user", "assistant"]
    seed = row_to_messages({"instruction": "i", "instances": [{"input": "", "output": "o"}]})
    assert seed[-1]["content"] == "o"


def test_bad_rows_name_the_row(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a row needs 'messages'.*\['question'\]"):
        load_examples([f], tok, 64)
    with pytest.raises(DataError, match="no assistant message"):
        row_to_messages({"messages": [{"role": "user", "content": "hi"}]}, "x")
    with pytest.raises(DataError, match="message 0 needs a role"):
        row_to_messages({"messages": [{"role": "robot", "content": "hi"}]}, "x")


def test_loss_only_on_assistant_tokens(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "question here"},
            {"role": "assistant", "content": "answer one"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "answer two"}]
    ex = encode_messages(tok, msgs, 200)
    learned = [t for t in ex.labels if t != -100]
    end = tok.special_tokens["<|end|>"]
    want = tok.encode("answer one") + [end] + tok.encode("answer two") + [end]
    assert learned == want
    assert ex.labels[:-1] == [y if y != -100 else -100 for y in ex.labels[:-1]]
    assert [x for x, y in zip(ex.input_ids[1:], ex.labels[:-1]) if y != -100] == want[:-1]  # y is x shifted
    short = encode_messages(tok, msgs, 5)   # truncated before any assistant token: nothing to learn
    assert short is None


def test_batches_pad_with_ignore_and_split_is_stable(tok):
    exs = [encode_messages(tok, row_to_messages(r), 64) for r in ROWS]
    x, y = collate(exs[:3], pad_id=7)
    lens = [len(e) for e in exs[:3]]
    for i, n in enumerate(lens):
        assert (y[i, n:] == -100).all() and (x[i, n:] == 7).all()
    train, held = split_heldout(exs, 0.2, seed=1)
    train2, held2 = split_heldout(list(reversed(exs)), 0.2, seed=1)
    assert sorted(map(lambda e: tuple(e.input_ids), held)) == sorted(map(lambda e: tuple(e.input_ids), held2))
    assert 5 < len(held) < 45 and len(train) + len(held) == len(exs)
    loader = SFTLoader(exs, 8, seed=3)
    first = [loader.next_batch() for _ in range(5)]
    state = loader.state_dict()
    nxt = loader.next_batch()
    loader2 = SFTLoader(exs, 8, seed=3)
    loader2.load_state_dict(state)
    assert torch.equal(loader2.next_batch()[0], nxt[0])
    assert loader.pad_fraction() < 0.1 and first


# ---------------------------------------------------------------------------------------------------- methods


METHODS = ["full", "lora", "qlora", "prefix", "adapter"]


def _method_cfg(method):
    return from_dict(FinetuneConfig, {"method": method, "lora": {"r": 4, "targets": ["all-linear"]},
                                      "quant": {"mode": "nf4", "group_size": 32}, "prefix": {"n_prefix": 4,
                                      "hidden": 32}, "adapter": {"bottleneck": 8}})


@pytest.mark.parametrize("method", METHODS)
def test_only_intended_params_get_gradients_and_base_stays(tok, method):
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_method(model, method, _method_cfg(method))
    expect = {"full": lambda n: True, "lora": lambda n: ".lora_" in n, "qlora": lambda n: ".lora_" in n,
              "prefix": lambda n: n.startswith("prefix."), "adapter": lambda n: ".adapter." in n}[method]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(expect(n) for n in trainable)
    assert all(expect(n) == (n in trainable) for n, _ in model.named_parameters())
    x = torch.randint(0, tok.vocab_size, (2, 12))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        _, loss = model(x, targets=x)
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        opt.zero_grad()
    if method == "full":
        return
    after = model.state_dict()
    for k, v in before.items():   # every base tensor that still exists under its name is bit-identical
        if k in after:
            assert torch.equal(after[k], v), k


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_heldout_loss(base_dir, method, tmp_path):
    folder, data = base_dir
    cfg = from_dict(FinetuneConfig, {
        "run_dir": str(tmp_path / method), "base": str(folder), "method": method, "steps": 25, "batch_size": 8,
        "log_every": 5, "n_samples": 1, "sample_tokens": 8, "device": "cpu",
        "lr": {"full": 3e-3, "prefix": 3e-2}.get(method, 1e-2),
        "data": {"train": [str(data)], "valid_fraction": 0.15, "max_len": 64},
        "lora": {"r": 4, "targets": ["all-linear"]}, "quant": {"group_size": 32},
        "prefix": {"n_prefix": 4, "hidden": 32},
        "adapter": {"bottleneck": 8}})
    r = finetune(cfg)
    assert r["heldout_loss_after"] < r["heldout_loss_base"] - 0.15, r
    assert r["params_trainable"] < r["params_total"] or method == "full"
    assert r["optimizer_state_bytes"] == 2 * 4 * r["params_trainable"]     # AdamW: two fp32 moments
    written = {p.name for p in (tmp_path / method).iterdir()}
    assert {"summary.json", "report.md", "metrics.jsonl", "tokenizer.json"} <= written
    assert ("model.safetensors" if method == "full" else "adapter.safetensors") in written
    if method in ("lora", "prefix", "adapter"):  # the saved adapter reproduces the trained model's loss
        from lmstack.finetune.sft import heldout_loss, load_examples

        model = load_base(folder)
        load_adapter(model, tmp_path / method)
        exs, _ = load_examples([data], load_tokenizer(folder), 64)
        assert heldout_loss(model, exs[:8]) == pytest.approx(
            heldout_loss(_trained(folder, tmp_path / method), exs[:8]), abs=1e-6)
        from lmstack.infer.text import load_run  # generate/chat/eval load base + adapter directly

        direct, _ = load_run(tmp_path / method)
        assert heldout_loss(direct, exs[:8]) == pytest.approx(heldout_loss(model, exs[:8]), abs=1e-6)


def load_tokenizer(folder):
    from lmstack.tokenizer import load_tokenizer as lt

    return lt(folder)


def _trained(folder, run):
    model = load_base(folder)
    load_adapter(model, run)
    return model


def test_adapter_for_a_different_base_is_refused(base_dir, tok, tmp_path):
    folder, data = base_dir
    cfg = from_dict(FinetuneConfig, {"run_dir": str(tmp_path / "r"), "base": str(folder), "steps": 2,
                                     "n_samples": 0, "data": {"train": [str(data)], "max_len": 48},
                                     "lora": {"r": 2}})
    finetune(cfg)
    with pytest.raises(LmstackError, match=r"different base model:.*d_model=64 \(this base: 32\)"):
        load_adapter(_model(tok, d_model=32), tmp_path / "r")
    with pytest.raises(LmstackError, match="different checkpoint of this architecture"):
        load_adapter(_model(tok, seed=5), tmp_path / "r")
    load_adapter(_model(tok, seed=5), tmp_path / "r", check_base=False)
    # Prefix (and adapter) runs load directly (base + adapter) and merge into a self-contained folder.
    from lmstack.infer.text import load_run

    cfg2 = from_dict(FinetuneConfig, {**{"run_dir": str(tmp_path / "p"), "base": str(folder), "steps": 1,
                                         "n_samples": 0, "method": "prefix",
                                         "data": {"train": [str(data)], "max_len": 48}}})
    finetune(cfg2)
    import json as _json

    assert _json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base"] == str(Path(folder).resolve())
    direct, tok2 = load_run(tmp_path / "p")
    with pytest.raises(LmstackError, match="no Hugging Face form"):
        merge_run(tmp_path / "p", tmp_path / "m", hf_format=True)
    merge_run(tmp_path / "p", tmp_path / "m")
    bundled, _ = load_run(tmp_path / "m")
    from lmstack.cli import LAYER_CLIS, main

    if "lmstack.infer.cli" not in LAYER_CLIS:
        LAYER_CLIS.append("lmstack.infer.cli")
    assert main(["generate", str(tmp_path / "p"), "--prompt", "hello", "--max_new_tokens", "4"]) == 0
    x = torch.tensor([tok2.encode("hello world")])
    with torch.no_grad():
        plain = load_base(folder).eval()(x)
        assert (direct(x) - bundled(x)).abs().max() <= 1e-6
        assert (direct(x) - plain).abs().max() > 0


def test_merge_cli_writes_a_model_that_matches(base_dir, tmp_path, monkeypatch):
    import lmstack.cli as cli

    if "lmstack.finetune.cli" not in cli.LAYER_CLIS:
        monkeypatch.setattr(cli, "LAYER_CLIS", [*cli.LAYER_CLIS, "lmstack.finetune.cli"])
    folder, data = base_dir
    cfg_file = tmp_path / "ft.toml"
    cfg_file.write_text(f'run_dir = "{tmp_path / "run"}"\nbase = "{folder}"\nsteps = 3\nn_samples = 0\nlr = 0.05\n'
                        f'[data]\ntrain = ["{data}"]\nmax_len = 48\n')
    assert cli.main(["finetune", str(cfg_file), "--method", "lora", "--lora.targets", "[q, v, down]"]) == 0
    assert cli.main(["finetune", "merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    from lmstack.model import load

    merged = load(tmp_path / "merged")
    adapted = _trained(folder, tmp_path / "run")
    x = torch.randint(0, 290, (2, 10))
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() <= 1e-5
        assert (merged(x) - load_base(folder)(x)).abs().max() > 1e-4
    assert cli.main(["finetune", str(cfg_file), "--lora.targets", "[nope]"]) == 2   # a clear one-line error


# ---------------------------------------------------------------------------------------------------- QLoRA


def test_nf4_levels_match_bitsandbytes_table():
    table = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    assert torch.allclose(nf4_levels(), torch.tensor(table), atol=2e-6)


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_quant_linear_round_trip(mode):
    lin = torch.nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, mode, 32)
    w = lin.weight.detach()
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert err <= {"int8": 1 / 254 + 1e-6, "int4": 1 / 14 + 1e-6, "nf4": 0.17}[mode]
    if mode != "int8":   # codes hit exactly: quantizing the dequantized weight changes nothing
        assert torch.equal(QuantLinear.from_linear(q.dequantized_linear(), mode, 32).codes, q.codes)
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias), atol=1e-6)


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("int4", 0.1), ("nf4", 0.1)])
def test_qlora_base_memory_and_fidelity(tok, mode, tol):
    ref = _model(tok).eval()
    model = _model(tok).eval()
    fp32_bytes = base_bytes(model)
    quantize_base(model, mode, group_size=32)
    add_lora(model, LoraConfig(r=4, targets=["all-linear"]))
    lora_model = _model(tok)
    add_lora(lora_model, LoraConfig(r=4, targets=["all-linear"]))
    assert base_bytes(lora_model) == fp32_bytes
    q_bytes = base_bytes(model)
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in ref.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head")
    saved = fp32_bytes - q_bytes
    assert saved >= linear_fp32 * (0.7 if mode == "int8" else 0.8)     # 4 -> ~1 or ~0.56 bytes a weight
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ref(x), model(x)
    assert (a - b).abs().max() <= tol
    if mode == "nf4":
        kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
        assert kl.sum(-1).mean() <= 1e-3


# ---------------------------------------------------------------------------------------------------- prefix, adapters


def test_prefix_equals_a_cached_real_prefix():
    """With no position encoding, prefix K/V taken from a real prompt's KV cache reproduce the full sequence."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=50, n_layer=2, d_model=32, n_head=4, pos="none",
                               max_seq_len=32)).eval()
    prompt, cont = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        full = model(torch.cat([prompt, cont], 1))[:, 5:]
        cache = KVCache.for_model(model, 1, 32)
        model(prompt, kv_cache=cache)
    enc = add_prefix(model, PrefixConfig(n_prefix=5, reparam=False))
    with torch.no_grad():
        table = torch.stack([torch.stack([cache.k[i][0, :, :5], cache.v[i][0, :, :5]]) for i in range(2)])
        # table (L, 2, G, P, D) -> the encoder's flat layout (P, L*2*G*D)
        enc.table.copy_(table.permute(3, 0, 1, 2, 4).reshape(5, -1))
        got = model(cont)
        step = KVCache.for_model(model, 1, 32)       # the prefix also works with incremental decoding
        first = model(cont[:, :4], kv_cache=step)
        rest = model(cont[:, 4:], kv_cache=step)
    assert (got - full).abs().max() <= 1e-5
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-5
    remove_prefix(model)
    assert not hasattr(model, "prefix")


def test_prefix_bake_keeps_outputs():
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=32)).eval()
    add_prefix(model, PrefixConfig(n_prefix=3, hidden=16, init_std=0.5))
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        a = model(x)
        bake_prefix(model)
        b = model(x)
    assert torch.allclose(a, b, atol=1e-6) and model.prefix.mlp is None


@pytest.mark.parametrize("placement,count", [("houlsby", 4), ("pfeiffer", 2)])
def test_adapters_start_as_identity(tok, placement, count):
    ref, model = _model(tok).eval(), _model(tok).eval()
    assert add_adapters(model, AdapterConfig(bottleneck=4, placement=placement)) == count
    x = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_config_errors():
    with pytest.raises(ConfigError, match="lora.r"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="method"):
        from_dict(FinetuneConfig, {"method": "magic"})
    with pytest.raises(ConfigError, match="group_size"):
        QuantLinear(30, 8, "nf4", 64)


def test_speedrun_sft_stage_with_default_data(base_dir, tmp_path):
    """The speedrun's SFT stage: LoRA on RUN/pretrain with the generated stdlib data; a markdown report."""
    import shutil

    from lmstack.finetune.run import speedrun_sft

    folder, _ = base_dir
    shutil.copytree(folder, tmp_path / "pretrain")
    results, md = speedrun_sft(tmp_path, steps=3, n_samples=1, sample_tokens=4,
                               data={"default_rows": 200, "max_len": 48})
    rows = [json.loads(line) for line in (tmp_path / "sft" / "sft_data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) > 150 and all(r["instruction"] and r["output"] and r["source"].startswith("docstring:")
                                   for r in rows)
    assert results["method"] == "lora" and (tmp_path / "sft" / "adapter.safetensors").is_file()
    assert "held-out loss" in md and "**Prompt:**" in md and f"{results['heldout_loss_after']:.3f}" in md


def test_lora_run_resumes_exactly_through_the_trainer_task(tok, tmp_path):
    """The trainer's Task hook: a LoRA run stopped after step 5 (checkpoint at 3) and resumed ends with the
    same adapter, bit for bit, as one that never stopped; only the adapter is checkpointed."""
    from safetensors.torch import load_file, save_file

    from lmstack.finetune.lora import adapter_state_dict, load_adapter_state
    from lmstack.finetune.sft import SFTLoader, eval_batches
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer

    exs = [encode_messages(tok, row_to_messages(r), 48) for r in ROWS[:40]]

    def run(folder, until=None, resume=False):
        model = _model(tok)
        add_lora(model, LoraConfig(r=2, targets=["q", "v"]))
        def save_weights(m, f):
            save_file({k: v.contiguous() for k, v in adapter_state_dict(m).items()}, str(f / "adapter.safetensors"))

        def load_weights(m, f):
            load_adapter_state(m, load_file(str(f / "adapter.safetensors")))

        task = Task(model=model, loader=SFTLoader(exs, 4, seed=1), eval_batches=lambda: eval_batches(exs[:4], 4),
                    tokenizer=tok, save_weights=save_weights, load_weights=load_weights)
        cfg = TrainConfig(run_dir=str(folder), steps=6, batch_size=4, ckpt_every=3, eval_every=0, log_every=1,
                          sample_prompts=[], device="cpu", peak_tflops=1.0, model={"vocab_size": tok.vocab_size},
                          data=DataConfig(seq_len=48), optim=OptimConfig(lr=1e-2, warmup_steps=2))
        trainer = Trainer(cfg, resume=resume, task=task)
        try:
            trainer.fit(until=until)
        finally:
            trainer.close()
        return adapter_state_dict(model)

    straight = run(tmp_path / "a")
    run(tmp_path / "b", until=5)
    resumed = run(tmp_path / "b", resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    ckpt = next((tmp_path / "b" / "checkpoints").iterdir())
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_shared_alpaca_and_kto_style_messages_load_as_sft_examples(shared_data):
    """The ../shared/data/sft Alpaca demo (instruction/input/output JSON list) loads with assistant-only labels."""
    from lmstack.finetune.sft import load_examples
    from lmstack.tokenizer import train_bpe

    path = shared_data / "sft" / "llamafactory_alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = json.loads(path.read_text(encoding="utf-8"))
    tok = train_bpe([r["instruction"] + " " + r["output"] for r in rows[:200]], vocab_size=400)
    examples, stats = load_examples([path], tok, max_len=256, limit=50)
    assert stats["rows"] == 50 and stats["examples"] == len(examples) > 40
    for ex in examples[:10]:
        targets = [lab for lab in ex.labels if lab != -100]
        assert 0 < len(targets) < len(ex.input_ids)                  # the prompt is never a target
    answer = tok.decode([lab for lab in examples[0].labels if lab != -100])   # labels are next-token targets
    assert answer.startswith(rows[0]["output"][:40])
    assert rows[0]["instruction"][:20] not in answer
