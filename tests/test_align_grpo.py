"""GRPO: the loss against trl 1.16's GRPOTrainer on the same inputs, the advantages against trl's nanstd, the
documented limits (beta 0; one pass = REINFORCE with the group baseline), a run on the one trainer (full
fine-tuning and LoRA, the reference never changes, failing rewards counted, exact resume), the CLI edge, the
speedrun hook on a tiny run and GSM8K end to end.

How the trl parity is computed: ``GRPOTrainer._compute_loss`` is called unbound on a minimal object that
holds the attributes it reads (loss type, clip ranges, beta, an identity accelerator) and whose
``_get_per_token_logps_and_entropies`` returns our fixed per-token log-probs, so trl's own loss code runs on
exactly the tensors our :func:`grpo_loss` gets.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmstack.align import grpo_loss
from lmstack.align.grpo import group_advantages, k3_kl

# ----------------------------------------------------------------------------------------------- trl parity


def _inputs(seed=0, b=6, t=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logps = old + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)   # ratios well outside the clip
    ref = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    for i, n in enumerate([7, 3, 5, 1, 6, 4]):
        mask[i, n:] = 0
    return logps, old, ref, adv, mask


def _trl_loss(logps, old, ref, adv, mask, *, beta, eps, eps_high, loss_type, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logps.shape
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction="sum": x, sync_gradients=True),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_matches_trl(loss_type, beta, eps_high):
    logps, old, ref, adv, mask = _inputs()
    want, metrics = _trl_loss(logps, old, ref, adv, mask, beta=beta, eps=0.2, eps_high=eps_high or 0.2,
                              loss_type=loss_type, max_len=9)
    got, kl, clipped = grpo_loss(logps, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                                 loss_type=loss_type, max_completion_length=9)
    assert abs(float(got) - float(want)) < 1e-6
    assert float(clipped.float().mul(mask).sum() / mask.sum()) > 0.1         # the clip really was exercised
    if beta:
        assert abs(float((kl * mask).sum() / mask.sum()) - metrics["kl"][0]) < 1e-6
    assert abs(float((clipped.float() * mask).sum() / mask.sum()) - metrics["clip_ratio/region_mean"][0]) < 1e-6


def test_group_advantages_match_trl_nanstd():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(1)
    r = torch.rand(12, generator=g)
    r[[2, 7]] = math.nan                       # failed rewards: out of their group's mean and std
    groups = r.view(3, 4)
    mean = torch.nanmean(groups, 1).repeat_interleave(4)
    std = nanstd(groups, dim=1).repeat_interleave(4)
    want = (r - mean) / (std + 1e-4)
    got = group_advantages(r, 4)
    ok = ~torch.isnan(r)
    assert torch.allclose(got[ok], want[ok], atol=1e-6)
    assert torch.equal(got[~ok], torch.zeros(2))
    assert torch.allclose(group_advantages(r, 4, scale="none")[ok], (r - mean)[ok], atol=1e-7)
    assert torch.equal(group_advantages(torch.ones(8), 4), torch.zeros(8))          # equal rewards: no signal


def test_beta_zero_limit_and_reinforce_gradient():
    logps, old, ref, adv, mask = _inputs(2)
    base, kl0, _ = grpo_loss(logps, old, None, adv, mask, beta=0.0)
    assert torch.equal(kl0, torch.zeros_like(logps))
    # beta -> 0: the KL term's contribution vanishes linearly
    small, _, _ = grpo_loss(logps, old, ref, adv, mask, beta=1e-9)
    assert abs(float(small) - float(base)) < 1e-8
    # the reference equal to the policy: k3 is exactly 0, whatever beta
    same, kl, _ = grpo_loss(logps, old, logps.clone(), adv, mask, beta=0.5)
    assert float(kl.abs().max()) == 0.0 and abs(float(same) - float(base)) < 1e-12
    assert float(k3_kl(logps, ref).min()) >= 0.0
    # one pass over the buffer (pi == pi_old): the gradient is REINFORCE with the group-mean baseline
    lp = old.clone().requires_grad_(True)
    loss, _, _ = grpo_loss(lp, old, None, adv, mask, beta=0.0)
    (g1,) = torch.autograd.grad(loss, lp)
    lp2 = old.clone().requires_grad_(True)
    pg = (-(adv[:, None] * lp2 * mask).sum(-1) / mask.sum(-1)).mean()
    (g2,) = torch.autograd.grad(pg, lp2)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_bad_loss_type_and_missing_reference():
    logps, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match="loss_type must be grpo, dr_grpo or dapo"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="beta != 0 needs ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="needs max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")


# ----------------------------------------------------------------------------------------- runs (tiny model)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random decoder and a BPE trained on arithmetic questions and worked answers."""
    from lmstack.align.rl_data import arithmetic_items
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    items = arithmetic_items(30, split="train", max_operand=9, ops=["+", "-"]) + \
        arithmetic_items(10, split="heldout", max_operand=9, ops=["+", "-"])
    tok = train_bpe([it["question"] + " " + it["solution"] for it in items], 300)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=96))
    folder = tmp_path_factory.mktemp("base")
    save(model, folder)
    tok.save(folder)
    return folder


def _cfg(base, run_dir, **kw):
    from lmstack.align.rl_config import OnlineConfig
    from lmstack.config import from_dict, merge

    fields = {"run_dir": str(run_dir), "base": str(base), "steps": 4, "minibatch_size": 8, "lr": 1e-3,
              "rollout": {"prompts": 4, "num_samples": 4, "max_new_tokens": 10},
              "data": {"arithmetic": {"max_operand": 9, "train_items": 24, "heldout_items": 6}, "eval_items": 6}}
    return from_dict(OnlineConfig, merge(fields, kw))


def digits(responses, items):
    """A shaping reward with spread even for an untrained model (the exact-match reward is all zeros there)."""
    return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]


def _rows(run):
    from lmstack.train.trainer import read_metrics

    return read_metrics(run / "metrics.jsonl")


def test_grpo_run_full_logs_metrics_and_keeps_the_reference(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from lmstack.align.online import run_online

    cfg = _cfg(tiny_base, tmp_path / "grpo", grpo={"beta": 0.1})
    res = run_online(cfg, extra_rewards=[(digits, 1.0)])
    rows = _rows(tmp_path / "grpo")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "response_len", "rollout_s", "rollout_tok_s",
                "clip_frac", "reward_failures", "reward_correct_strict", "reward_format_reward", "update_s"):
        assert key in train[0], key
    assert all(math.isfinite(r["loss"]) for r in train)
    assert any("exact_match_strict" in r and "exact_match_lenient" in r for r in rows)
    assert res["rollouts"] == 2 and res["reference_unchanged"] is True
    t = res["timing"]
    assert t["rollout_s"] > 0 and t["update_s"] > 0 and t["rollout_tokens"] > 0
    assert set(res["before"]) >= {"exact_match_strict", "exact_match_lenient", "reward_mean"}
    for name in ("reward.png", "report.md", "summary.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "grpo" / name).is_file(), name
    # the policy moved at this learning rate (the reference, a frozen copy, did not: checked above)
    before, after = load_file(str(tiny_base / "model.safetensors")), load_file(str(tmp_path / "grpo" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_lora_reference_is_the_base_with_the_adapter_disabled(tiny_base, tmp_path):
    from lmstack.align.online import run_online
    from lmstack.finetune.lora import adapters_disabled, lora_layers
    from lmstack.infer.text import load_run
    from lmstack.model import load

    cfg = _cfg(tiny_base, tmp_path / "lora", method="lora", lr=1e-2, lora={"r": 4, "targets": ["attention"]},
               grpo={"beta": 0.1, "loss_type": "dapo"})
    res = run_online(cfg, extra_rewards=[(digits, 1.0)])
    assert res["reference_unchanged"] is True
    assert (tmp_path / "lora" / "adapter.safetensors").is_file()
    trained, _ = load_run(tmp_path / "lora")            # the base + the saved adapter
    assert lora_layers(trained)
    base = load(tiny_base).eval()
    x = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad(), adapters_disabled(trained):
        assert torch.equal(trained(x), base(x))
    with torch.no_grad():
        assert not torch.allclose(trained(x), base(x))   # the adapter learned something
        assert all(layer.active == ["default"] for layer in lora_layers(trained).values())   # restored


def test_failing_reward_is_counted_and_never_a_nan_loss(tiny_base, tmp_path, capsys):
    from lmstack.align.online import run_online

    calls = {"n": 0}

    def flaky(responses, items):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("grader offline")
        return [math.nan if i % 3 == 0 else 0.5 for i in range(len(responses))]

    res = run_online(_cfg(tiny_base, tmp_path / "flaky", steps=2), extra_rewards=[(flaky, 1.0)])
    train = [r for r in _rows(tmp_path / "flaky") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert res["reward_failures"] > 0 and train[-1]["reward_failures"] > 0
    assert "flaky failed on" in res["reward_summary"] and "no gradient" in res["reward_summary"]
    assert "flaky failed on" in capsys.readouterr().err


def test_resume_is_exact(tiny_base, tmp_path):
    from lmstack.align.online import run_online

    kw = {"steps": 6, "minibatch_size": 4, "ckpt_every": 2, "rollout": {"prompts": 4, "num_samples": 4, "max_new_tokens": 8}}
    extra = [(digits, 1.0)]
    run_online(_cfg(tiny_base, tmp_path / "straight", **kw), extra_rewards=extra)
    stopped = run_online(_cfg(tiny_base, tmp_path / "resumed", **kw), extra_rewards=extra, until=3)   # a crash
    assert stopped == {"stopped_at": 3}
    run_online(_cfg(tiny_base, tmp_path / "resumed", **kw), extra_rewards=extra, resume=True)   # from step 2
    a = [(r["step"], r["loss"], r["reward_mean"]) for r in _rows(tmp_path / "straight") if "loss" in r]
    b = [(r["step"], r["loss"], r["reward_mean"]) for r in _rows(tmp_path / "resumed") if "loss" in r]
    assert a == b and len(a) == 6
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_validates_the_config_at_the_edge(tiny_base, tmp_path, capsys):
    from lmstack.cli import main

    cfg = tmp_path / "grpo.toml"
    cfg.write_text(f'base = "{tiny_base}"\nrun_dir = "{tmp_path / "cli"}"\nsteps = 1\nminibatch_size = 8\n'
                   '[rollout]\nprompts = 2\nnum_samples = 4\nmax_new_tokens = 6\n'
                   '[data.arithmetic]\ntrain_items = 8\nheldout_items = 2\n')
    assert main(["align", "grpo", str(cfg), "--grpo.bta", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config field 'grpo.bta' (did you mean 'grpo.beta'?)"
    assert main(["align", "grpo", str(cfg), "--rollout.num_samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rollout.num_samples: GRPO compares samples within a group") and "\n" not in err
    assert main(["align", "grpo", str(cfg), "--minibatch_size", "3"]) == 2
    assert "is not a multiple of minibatch_size * grad_accum = 3" in capsys.readouterr().err
    assert main(["align", "ppo", str(cfg), "--base", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["align", "grpo", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algo"] == "grpo" and out["steps"] == 1


def test_speedrun_hook_on_a_tiny_run(tiny_base, tmp_path):
    import shutil

    from lmstack.align.grpo import speedrun_grpo

    run = tmp_path / "speedrun"
    shutil.copytree(tiny_base, run / "pretrain")
    results, report = speedrun_grpo(
        run, warmup_steps=4, grpo_steps=2, warmup={"batch_size": 8}, minibatch_size=8,
        rollout={"prompts": 2, "num_samples": 4, "max_new_tokens": 8},
        data={"eval_items": 4, "arithmetic": {"train_items": 16, "heldout_items": 4}})
    for side in ("before", "after"):
        assert set(results[side]) >= {"exact_match_strict", "exact_match_lenient", "reward_mean"}
    assert results["heldout_items"] == 4 and results["steps"] == 2
    assert (run / "grpo" / "warmup" / "model.safetensors").is_file()       # the fine-tuning layer's run
    assert (run / "grpo" / "rl" / "reward.png").is_file() and (run / "grpo" / "summary.json").is_file()
    assert "| exact match, strict (`#### N`) |" in report and "| exact match, lenient (last number) |" in report
    assert "![reward curve](grpo/rl/reward.png)" in report
    assert "rollouts" in report and "updates" in report
    # GRPO's prompts are train-side problems the warm-up never saw; the paired change is reported
    warm = {json.loads(line)["messages"][-2]["content"] for line in
            (run / "grpo" / "warmup_data" / "train.jsonl").read_text().splitlines()}
    assert results["warmup_chains"] == 300 and results["train_prompts"] == 16
    from lmstack.align.rl_data import arithmetic_items

    rl = arithmetic_items(316, split="train", seed=1337, max_operand=9, n_terms=3, max_value=9,
                          heldout_fraction=0.25)[300:]
    assert not {it["question"] for it in rl} & warm
    assert results["paired"]["items"] == 4 and "Change on the 4 held-out items" in report


def test_gsm8k_end_to_end(shared_data, tmp_path):
    from lmstack.align.online import run_online
    from lmstack.align.rl_data import gsm8k_items
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    path = shared_data / "reasoning" / "gsm8k_train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    items = gsm8k_items(path, limit=40)
    assert all(it["answer"] and it["prompt"][-1]["role"] == "user" for it in items)
    tok = train_bpe([it["question"] + " " + it["solution"] for it in items], 512)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=256)),
         base)
    tok.save(base)
    res = run_online(_cfg(base, tmp_path / "gsm8k", steps=2, data={"source": "gsm8k", "train": [str(path)],
                                                                    "max_train": 40, "eval_items": 4}),
                     extra_rewards=[(digits, 1.0)])
    assert res["heldout_items"] == 4 and res["train_prompts"] >= 4
    assert set(res["after"]) >= {"exact_match_strict", "exact_match_lenient"}
    rows = [r for r in _rows(tmp_path / "gsm8k") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_grpo_raises_heldout_strict_exact_match_on_a_tiny_task(tmp_path):
    """A tiny task where what GRPO must learn is clear: the answer is easy (``What is 37 - 37?``, always 0) but
    must come in the required ``#### N`` form. The supervised warm-up (through lmstack.finetune) shows it in the
    wrong form 70% of the time (``Answer: 0``), so after it greedy decoding is right under the lenient
    extraction and wrong under the strict one; GRPO with the strict reward (sampling finds the required form
    in ~20% of samples) moves the held-out prompts, never trained on, to the required form."""
    import random

    from lmstack.align.online import run_online
    from lmstack.config import from_dict
    from lmstack.data.split import is_heldout
    from lmstack.finetune.run import FinetuneConfig, finetune
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    rng = random.Random(0)
    rows, sft = {"train": [], "heldout": []}, []
    for n in range(100):
        q = f"What is {n} - {n}?"
        side = "heldout" if is_heldout(q, 0.2, 0) else "train"
        rows[side].append({"prompt": q, "answer": "0"})
        if side == "train":
            for _ in range(2):
                tail = "#### 0" if rng.random() < 0.3 else "Answer: 0"
                sft.append({"prompt": q, "response": f"<think>{n} - {n} = 0</think>\n{tail}"})
    for side, items in rows.items():
        (tmp_path / f"{side}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    tok = train_bpe([r["prompt"] + " " + r["response"] for r in sft], 400)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, max_seq_len=64)),
         base)
    tok.save(base)
    finetune(from_dict(FinetuneConfig, {"run_dir": str(tmp_path / "warm"), "base": str(base), "method": "full",
                                        "steps": 150, "batch_size": 16, "dtype": "fp32", "lr": 3e-3, "n_samples": 0, "log_every": 50,
                                        "data": {"train": [str(tmp_path / "sft.jsonl")], "max_len": 40}}))
    res = run_online(_cfg(tmp_path / "warm", tmp_path / "grpo", steps=30, minibatch_size=32, lr=3e-4,
                          warmup_steps=2, rollout={"prompts": 8, "num_samples": 8, "max_new_tokens": 20,
                                                    "temperature": 0.7},
                          data={"source": "rows", "train": [str(tmp_path / "train.jsonl")],
                                "valid": [str(tmp_path / "heldout.jsonl")], "eval_items": 40},
                          reward={"correct": 1.0, "format": 0.2}, grpo={"beta": 0.02}))
    b, a = res["before"], res["after"]
    assert b["exact_match_lenient"] >= 0.5 > b["exact_match_strict"]     # right answers, wrong form
    assert a["exact_match_strict"] >= b["exact_match_strict"] + 0.3, (b, a)


def test_the_shipped_grpo_config_loads_for_both_algorithms():
    from pathlib import Path

    from lmstack.align.rl_config import load_online_config

    path = Path(__file__).resolve().parents[1] / "configs" / "grpo_arith.toml"
    for algo in ("grpo", "ppo"):
        cfg = load_online_config(str(path), ["--base", "runs/sft"], algo=algo)
        assert cfg.algo == algo and cfg.rollout.num_samples == 8 and cfg.data.source == "arithmetic"


def test_paired_change_counts_flips_and_brackets_the_delta():
    from lmstack.align.online import paired_change

    items = [{"answer": str(i)} for i in range(10)]
    before = [f"#### {i}" if i < 5 else "#### 99" for i in range(10)]          # 5 right
    after = [f"#### {i}" if i != 0 else "#### 99" for i in range(10)]          # 9 right: 5 turned right, 1 wrong
    after[1] = f"The answer is {1}."                                           # right only when lenient
    out = paired_change(before, after, items)
    assert out["items"] == 10
    assert out["lenient"]["turned_right"] == 5 and out["lenient"]["turned_wrong"] == 1
    assert out["lenient"]["delta"] == pytest.approx(0.4)
    assert out["strict"]["turned_right"] == 5 and out["strict"]["turned_wrong"] == 2
    assert out["strict"]["delta"] == pytest.approx(0.3)
    lo, hi = out["lenient"]["ci95"]
    assert lo <= 0.4 <= hi and 0 < out["lenient"]["p_value"] <= 1
    same = paired_change(before, before, items)
    assert same["strict"]["delta"] == 0 and same["strict"]["turned_right"] == same["strict"]["turned_wrong"] == 0
