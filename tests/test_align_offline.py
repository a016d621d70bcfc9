"""Offline alignment end to end on tiny models: preference data forms and bad rows, DPO/KTO/reward-model runs
through the one trainer, the reference staying frozen, accumulation, LoRA's disabled-adapter reference, the
speedrun hook and the CLI's errors. Tiny models and tokenizers are built here; nothing is downloaded."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from lmstack.align.config import DPOConfig, KTOConfig, RMConfig
from lmstack.align.data import (collate_pairs, load_pairs, load_unpaired, row_to_pair, row_to_unpaired,
                                split_hh_dialogue)
from lmstack.config import from_dict
from lmstack.errors import ConfigError, DataError
from lmstack.model import build_model, preset, save

ANIMALS = ["cat", "dog", "cow", "hen", "fox", "owl", "bee", "ant", "elk", "yak"]


def _rows(n=160, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, k = ANIMALS[i % 10], rng.randint(1, 99)
        out.append({"prompt": f"What sound does the {a} number {k} make?", "chosen": f"The {a} makes a happy sound.",
                    "rejected": f"No idea, go away {k}."})
    return out


@pytest.fixture(scope="module")
def tok():
    from lmstack.tokenizer import train_bpe

    return train_bpe([r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in _rows()] +
                     ["Human Assistant hello how are you fine thanks"], 400)


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=96))


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    save(_model(tok), root / "base")
    tok.save(root / "base")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return root


def _cfg(cls, base, run, **kw):
    fields = {"run_dir": str(run), "base": str(base / "base"), "steps": 6, "batch_size": 8, "log_every": 3,
              "warmup_steps": 1, "device": "cpu", "dtype": "fp32",
              "data": {"train": [str(base / "pairs.jsonl")], "max_len": 48}} | kw
    return from_dict(cls, fields)


# ---------------------------------------------------------------------------------------------------- data


def test_hh_dialogue_prompt_is_the_shared_turns_and_loss_is_on_the_last_reply(tok):
    row = {"chosen": "\n\nHuman: hello\n\nAssistant: fine thanks\n\nHuman: how are you\n\nAssistant: fine",
           "rejected": "\n\nHuman: hello\n\nAssistant: fine thanks\n\nHuman: how are you\n\nAssistant: go away"}
    pair = row_to_pair(row)
    assert pair.prompt == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"},
                           {"role": "user", "content": "how are you"}]
    assert (pair.chosen, pair.rejected) == ("fine", "go away")
    pairs, _ = load_pairs(None, tok, 64, rows=[row])
    scored = tok.decode([t for t in pairs[0].chosen.labels if t != -100])
    assert scored == "fine<|end|>"                       # the earlier assistant turn is prompt, not target
    with pytest.raises(DataError, match="differ before their last turn"):
        row_to_pair({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(DataError, match="HH-RLHF dialogues"):
        split_hh_dialogue("no turns here")


def test_pairwise_and_unpaired_forms(tok):
    p = row_to_pair({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": "b", "system": "terse"})
    assert p.prompt[0] == {"role": "system", "content": "terse"} and (p.chosen, p.rejected) == ("a", "b")
    u = row_to_unpaired({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "label": False})
    assert (u.prompt, u.completion, u.label) == ([{"role": "user", "content": "q"}], "a", False)
    u = row_to_unpaired({"prompt": "q", "completion": "a", "label": True})
    assert u.label and u.completion == "a"
    with pytest.raises(DataError, match="'label' must be true"):
        row_to_unpaired({"prompt": "q", "completion": "a", "label": "yes"})
    with pytest.raises(DataError, match="needs 'chosen' and 'rejected'"):
        row_to_pair({"prompt": "q", "response": "a"})
    x, y = collate_pairs(load_pairs(None, tok, 48, rows=_rows(4))[0], pad_id=0)
    assert x["input_ids"].shape[0] == 8 and y["labels"].shape == x["input_ids"].shape


def test_shared_sharegpt_and_kto_demos_load(shared_data):
    from lmstack.tokenizer import train_bpe

    dpo_path = shared_data / "preference" / "llamafactory_dpo_en_demo.json"
    kto_path = shared_data / "preference" / "llamafactory_kto_en_demo.json"
    if not dpo_path.is_file() or not kto_path.is_file():
        pytest.skip("LLaMA-Factory preference demos not present")
    rows = json.loads(dpo_path.read_text(encoding="utf-8"))[:40]
    tok = train_bpe([r["chosen"]["value"] + r["rejected"]["value"] for r in rows], 400)
    pairs, stats = load_pairs([dpo_path], tok, 384, limit=40)
    assert stats["rows"] == 40 and len(pairs) + stats["prompt_too_long"] + stats["identical"] == 40
    first = row_to_pair(rows[0])
    assert first.prompt[0]["content"] == rows[0]["conversations"][0]["value"]
    assert first.chosen == rows[0]["chosen"]["value"]
    items, kstats = load_unpaired([kto_path], tok, 384, limit=40)
    assert kstats["rows"] == 40 and 0 < kstats["desirable"] < len(items)


def test_bad_rows_are_counted_reported_and_skipped(tok, capsys):
    good = _rows(3)
    bad = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "  ", "rejected": "b"},
           {"prompt": "word " * 80, "chosen": "a", "rejected": "b"}]
    pairs, stats = load_pairs(None, tok, 40, rows=good + bad)
    assert len(pairs) == 3
    assert (stats["identical"], stats["empty_response"], stats["prompt_too_long"]) == (1, 1, 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[align] preference data: skipped 3 of 6 rows (identical: 1, empty response: 1, "
                   "prompt too long: 1)"]
    with pytest.raises(DataError, match=r"no usable preference rows of 2: 'chosen' equals 'rejected'"):
        load_pairs(None, tok, 40, rows=[bad[0], bad[0]])
    with pytest.raises(DataError, match=r"raise data.max_len"):
        load_pairs(None, tok, 40, rows=[bad[2]])
    with pytest.raises(DataError, match=r"'completion'\) is empty"):
        load_unpaired(None, tok, 40, rows=[{"prompt": "q", "completion": "", "label": True}])


# ---------------------------------------------------------------------------------------------------- runs


def test_dpo_lora_raises_heldout_accuracy_and_margin(base):
    from lmstack.align.dpo import dpo

    r = dpo(_cfg(DPOConfig, base, base / "dpo_lora", lr=5e-3))
    b, a = r["before"], r["after"]
    assert b["val_loss"] == pytest.approx(math.log(2), abs=1e-12)      # policy == reference at the start
    assert b["val_margin"] == 0.0 and b["val_accuracy"] == 0.0
    assert a["val_margin"] > 0.05 and a["val_accuracy"] > 0.9 and a["val_loss"] < b["val_loss"]
    run = base / "dpo_lora"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "loss" in x]
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(train_rows[-1])
    assert any("val_accuracy" in x for x in rows)
    assert (run / "adapter.safetensors").is_file() and (run / "curves.png").stat().st_size > 1000
    assert "implicit-reward accuracy" in (run / "report.md").read_text()


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_runs_raise_heldout_accuracy_without_a_reference(base, loss_type, monkeypatch):
    from lmstack.align import dpo as dpo_mod
    from lmstack.align import offline

    copies = []
    real_copy = offline.frozen_copy
    monkeypatch.setattr(offline, "frozen_copy", lambda m: copies.append(1) or real_copy(m))
    beta = 2.0 if loss_type == "simpo" else 0.1
    r = dpo_mod.dpo(_cfg(DPOConfig, base, base / f"free_{loss_type}", loss_type=loss_type, beta=beta, method="full",
                         lr=2e-3))
    b, a = r["before"], r["after"]
    assert not copies                                   # no reference model was built
    assert a["val_margin"] > b["val_margin"] and a["val_accuracy"] > max(b["val_accuracy"], 0.8)
    assert a["val_loss"] < b["val_loss"]
    report = (base / f"free_{loss_type}" / "report.md").read_text()
    assert f"{loss_type.upper()} (**{loss_type}**" in report and "reference-free" in report


def test_orpo_run_loss_is_the_chosen_nll_minus_the_odds_term():
    from lmstack.align.dpo import orpo_odds_ratio, pair_loss

    cfg = DPOConfig(base="x", loss_type="orpo", beta=0.25)
    c, r = torch.tensor([-0.5, -1.0]), torch.tensor([-2.0, -0.7])
    loss, cr, rr = pair_loss(cfg, c, r, None, None)
    ratio, _, _ = orpo_odds_ratio(c, r, beta=0.25)
    assert loss.item() == pytest.approx((-c.mean() - ratio.mean()).item())
    assert torch.equal(cr, 0.25 * c) and torch.equal(rr, 0.25 * r)
    with pytest.raises(ConfigError, match="simpo_gamma"):
        DPOConfig(base="x", loss_type="simpo", simpo_gamma=-1)


def test_ipo_and_kto_runs(base):
    from lmstack.align.dpo import dpo
    from lmstack.align.kto import kto

    r = dpo(_cfg(DPOConfig, base, base / "ipo", loss_type="ipo", beta=0.5, lr=5e-3, precompute_ref=False))
    assert r["after"]["val_margin"] > r["before"]["val_margin"] == 0.0
    k = kto(_cfg(KTOConfig, base, base / "kto", lr=5e-3))
    assert k["before"]["val_loss"] == pytest.approx(0.5, abs=1e-12)     # 1 - sigmoid(0) at the start
    assert k["after"]["val_margin"] > 0.05 and k["after"]["val_accuracy"] > k["before"]["val_accuracy"]


def _trainer(tok, model, loader, run, loss_fn, steps=1, lr=1e-2, grad_accum=1, batch_size=8):
    from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
    from lmstack.train.trainer import Task, Trainer

    task = Task(model=model, loader=loader, eval_batches=lambda: [], tokenizer=tok, loss_fn=loss_fn,
                evaluate=lambda m: {})
    cfg = TrainConfig(run_dir=str(run), steps=steps, batch_size=batch_size, grad_accum=grad_accum, log_every=1,
                      sample_prompts=[], device="cpu", dtype="fp32", peak_tflops=1.0,
                      model={"vocab_size": tok.vocab_size}, data=DataConfig(seq_len=48),
                      optim=OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0, schedule="constant"))
    return Trainer(cfg, task=task)


class _Fixed:
    """A loader that serves the given batches in order (the same data for both accumulation layouts)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def next_batch(self):
        b = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def _step_grads(trainer):
    grads = {}
    step = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.optimizer.step = capture
    trainer.train_step()
    trainer.close()
    return grads


def test_reference_frozen_every_param_moves_and_accumulation_matches(tok, tmp_path):
    """Full DPO with a live frozen reference: after a high-LR step every trainable tensor changed and the
    reference's did not; one step of batch 8 x 1 has the same gradients as batch 1 x accumulation 8."""
    from lmstack.align.dpo import make_loss_fn
    from lmstack.align.offline import frozen_copy

    pairs, _ = load_pairs(None, tok, 48, rows=_rows(8, seed=3))
    cfg = DPOConfig(base="x", beta=0.5, method="full")
    grads = {}
    for layout, (bs, acc) in {"8x1": (8, 1), "1x8": (1, 8)}.items():
        policy = _model(tok, seed=1)
        ref = frozen_copy(policy)
        ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        batches = [collate_pairs(pairs)] if bs == 8 else [collate_pairs([p]) for p in pairs]
        trainer = _trainer(tok, policy, _Fixed(batches), tmp_path / layout, make_loss_fn(cfg, ref), lr=1e-2,
                           grad_accum=acc, batch_size=bs)
        grads[layout] = _step_grads(trainer)
        assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
        unchanged = [n for n, p in policy.named_parameters() if torch.equal(before[n], p.detach())]
        assert unchanged == []
    assert grads["8x1"].keys() == grads["1x8"].keys()
    for n in grads["8x1"]:
        assert torch.allclose(grads["8x1"][n], grads["1x8"][n], atol=1e-6, rtol=1e-4), n


def test_lora_reference_is_the_base_with_the_adapter_disabled(tok, tmp_path):
    """No second copy: the reference forward is the policy with adapters off (equal to the base model's
    logits, also when merged), and the adapters are back on afterwards. A LoRA step moves every B at step 1
    (A's gradient is zero while B = 0) and every A from step 2."""
    from lmstack.align.dpo import make_loss_fn
    from lmstack.finetune.lora import LoraConfig, add_lora, adapters_disabled, lora_layers, merge_lora

    policy = _model(tok)
    plain = _model(tok)
    add_lora(policy, LoraConfig(r=2, targets=["q", "v"]))
    for m in lora_layers(policy).values():
        for p in m.lora_B["default"].values():
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        adapted = policy(x)
        assert not torch.allclose(adapted, plain(x), atol=1e-4)
        with adapters_disabled(policy):
            assert torch.allclose(policy(x), plain(x), atol=1e-6)
        assert torch.equal(policy(x), adapted)
        merge_lora(policy)
        with adapters_disabled(policy):
            assert torch.allclose(policy(x), plain(x), atol=1e-5)
        assert torch.allclose(policy(x), adapted, atol=1e-5)

    fresh = _model(tok)
    add_lora(fresh, LoraConfig(r=2, targets=["q", "v"]))
    pairs, _ = load_pairs(None, tok, 48, rows=_rows(8, seed=4))
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    trainer = _trainer(tok, fresh, _Fixed([collate_pairs(pairs)]), tmp_path / "l",
                       make_loss_fn(DPOConfig(base="x"), None), steps=2, lr=1e-2)
    trainer.fit()
    trainer.close()
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(before[n], p.detach())}
    assert trainable and changed == trainable          # every adapter tensor moved, no base tensor did


def test_reward_model_trains_saves_loads_and_scores(base, tok):
    from lmstack.align.reward import bradley_terry_loss, load_reward_model, score, train_reward_model

    z = torch.zeros(3)
    assert bradley_terry_loss(z, z).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(z + 1, z, margin=1.0).item() == pytest.approx(math.log(2))
    r = train_reward_model(_cfg(RMConfig, base, base / "rm", lr=2e-3, bootstrap=200))
    assert r["after"]["accuracy"] > 0.9 and r["after"]["ci"][0] > 0.5
    assert r["length_baseline"]["n"] == r["after"]["n"] and 0 <= r["length_baseline"]["accuracy"] <= 1
    assert "Preferring the longer reply scores" in (base / "rm" / "report.md").read_text()
    model = load_reward_model(base / "rm")
    prompts = ["What sound does the cat number 5 make?"] * 2
    s = score(model, tok, prompts, ["The cat makes a happy sound.", "No idea, go away 5."])
    assert s[0] > s[1]
    assert json.loads((base / "rm" / "reward_config.json").read_text())["head"] == "scalar"
    with pytest.raises(DataError, match="no reward_config.json"):
        load_reward_model(base / "base")


def test_encoder_reward_model_trains_ignores_padding_and_round_trips(tok, tmp_path):
    from lmstack.align.reward import load_reward_model, rewards, score, train_reward_model
    from lmstack.model.config import ModelConfig

    torch.manual_seed(0)
    enc = build_model(ModelConfig(arch="encoder", vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4,
                                  max_seq_len=96, norm_position="post", embed_norm=True, final_norm=False))
    save(enc, tmp_path / "enc")
    tok.save(tmp_path / "enc")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    cfg = from_dict(RMConfig, {"run_dir": str(tmp_path / "rm"), "base": str(tmp_path / "enc"), "steps": 30,
                               "batch_size": 8, "lr": 2e-3, "log_every": 10, "warmup_steps": 1, "device": "cpu",
                               "dtype": "fp32", "bootstrap": 200,
                               "data": {"train": [str(tmp_path / "pairs.jsonl")], "max_len": 48}})
    r = train_reward_model(cfg)
    # a random head already orders these two reply styles half the time; the learnt one separates them widely
    assert r["after"]["accuracy"] > 0.9 and r["heldout"]["val_margin"] > 1.0 and r["heldout"]["val_loss"] < 0.1
    model = load_reward_model(tmp_path / "rm")
    assert model.classifier.out_features == 1
    prompts = ["What sound does the cat number 5 make?"] * 2
    s = score(model, tok, prompts, ["The cat makes a happy sound.", "No idea, go away 5."])
    assert s[0] > s[1]
    # the reward reads the conversation only: padding after it does not move it (the encoder is bidirectional)
    ids = torch.randint(5, tok.vocab_size, (1, 12))
    labels = torch.full((1, 12), -100)
    labels[0, 6:10] = ids[0, 7:11]
    padded_ids = torch.cat([ids, torch.zeros(1, 8, dtype=torch.long)], 1)
    padded_labels = torch.cat([labels, torch.full((1, 8), -100)], 1)
    torch.testing.assert_close(rewards(model, ids, labels), rewards(model, padded_ids, padded_labels))


def test_length_baseline_prefers_the_longer_reply_and_halves_ties():
    from lmstack.align.data import PairExample
    from lmstack.align.reward import length_baseline
    from lmstack.finetune.sft import Example

    def ex(n_reply: int) -> Example:
        return Example([1, 2, 3] + [4] * n_reply, [-100, -100, -100] + [4] * n_reply)

    items = [PairExample(ex(5), ex(2)), PairExample(ex(2), ex(5)), PairExample(ex(3), ex(3)), PairExample(ex(9), ex(1))]
    out = length_baseline(items, n_resamples=200)
    assert out["n"] == 4 and out["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert out["ci"][0] <= out["accuracy"] <= out["ci"][1]
    assert length_baseline([])["n"] == 0


@pytest.mark.slow
def test_reward_model_on_hh_rlhf_beats_chance(shared_data, tmp_path):
    """A tiny reward model (from scratch, BPE on the slice) on 1000 HH-RLHF helpful pairs, 20% held out by hash.

    Learned absolute positions let the head read where the reply ends: within a pair the prompt is shared,
    so that is the reply's length, HH-RLHF's known bias (the chosen reply is the longer in 59% of pairs).
    A model this small learns little beyond it; the point is that the pipeline learns a real signal."""
    from lmstack.align.reward import train_reward_model
    from lmstack.tokenizer import train_bpe

    path = shared_data / "preference" / "hh_rlhf_helpful_base_test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    import gzip

    rows = [json.loads(x) for x in gzip.open(path, "rt", encoding="utf-8").read().splitlines()[:1000]]
    tok = train_bpe([r["chosen"] + r["rejected"] for r in rows], 1000)
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=64, n_head=4, max_seq_len=192,
                            pos="learned")), tmp_path / "base")
    tok.save(tmp_path / "base")
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(RMConfig, {"run_dir": str(tmp_path / "rm"), "base": str(tmp_path / "base"), "steps": 100,
                               "batch_size": 16, "lr": 3e-3, "log_every": 25, "device": "cpu", "dtype": "fp32",
                               "data": {"train": [str(tmp_path / "hh.jsonl")], "max_len": 192,
                                        "valid_fraction": 0.2}})
    r = train_reward_model(cfg)
    assert r["after"]["ci"][0] > 0.5, r["after"]


# ---------------------------------------------------------------------------------------------------- speedrun


def test_speedrun_dpo_on_a_tiny_run(tok, tmp_path):
    from lmstack.align.dpo import speedrun_dpo

    save(_model(tok), tmp_path / "chat_model")
    tok.save(tmp_path / "chat_model")
    sft = tmp_path / "sft" / "sft_data"
    sft.mkdir(parents=True)
    qa = [{"instruction": f"What sound does the {a} make?", "output": f"The {a} makes a {s} sound."}
          for a in ANIMALS for s in ("happy", "loud", "soft")]
    (sft / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[:24]))
    (sft / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[24:]))
    results, md = speedrun_dpo(tmp_path, steps=8, device="cpu", dtype="fp32", log_every=4, lr=5e-3)
    b, a = results["before"], results["after"]
    assert a["val_accuracy"] > b["val_accuracy"] and a["val_margin"] > b["val_margin"]
    assert results["data"]["heldout_items"] == 6
    assert f"{a['val_accuracy']:.3f}" in md and "Held-out implicit-reward accuracy" in md
    pairs = [json.loads(x) for x in (tmp_path / "dpo" / "pref_data" / "train.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_errors_exit_2_with_one_line(base, tmp_path):
    cfg = tmp_path / "dpo.toml"
    cfg.write_text(f'base = "{base / "base"}"\nsteps = 2\n[data]\ntrain = ["{base / "pairs.jsonl"}"]\n')
    cases = [(("align", "dpo", str(tmp_path / "missing.toml")), "missing.toml"),
             (("align", "dpo", str(cfg), "--beta", "-1"), "beta: must be positive"),
             (("align", "dpo", str(cfg), "--loss_type", "hinge"), "loss_type"),
             (("align", "kto", str(cfg), "--batch_size", "1"), "batch_size: KTO"),
             (("align", "rm", str(cfg), "--base", str(tmp_path / "nope")), "does not exist"),
             (("align",), "name a method")]
    for args, needle in cases:
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, p.stderr)


def test_config_validation_names_fields():
    with pytest.raises(ConfigError, match="label_smoothing: must be in"):
        DPOConfig(base="x", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="base: name the model folder"):
        DPOConfig()
    with pytest.raises(ConfigError, match="data.max_len"):
        from_dict(RMConfig, {"base": "x", "data": {"max_len": 2}})
