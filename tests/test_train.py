"""The trainer: schedules, decay groups, objectives, exact resume, accumulation invariance, the CLI, and a
tiny model that learns the default corpus."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.runs import list_checkpoints, read_json, read_jsonl
from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
from lmstack.train.objectives import mlm_mask, span_corrupt, span_counts, special_ids, step_generator
from lmstack.train.optim import lr_at, param_groups


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small byte-level shard set of word salad (fast to learn something from)."""
    from lmstack.data.pack import pack_texts
    from lmstack.train.trainer import byte_tokenizer

    rng = random.Random(0)
    words = "the trainer saves a checkpoint and the loader resumes at the exact next batch of tokens".split()
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(150)]
    path = tmp_path_factory.mktemp("shards") / "train"
    pack_texts(texts, byte_tokenizer(), path, workers=1)
    return str(path)


def tiny(run_dir, shards, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), steps=8, batch_size=4, log_every=1, eval_every=4, eval_batches=2,
                ckpt_every=4, sample_prompts=[], dtype="fp32", peak_tflops=1.0,
                model={"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4},
                optim=OptimConfig(lr=1e-2, warmup_steps=2), data=DataConfig(train=[shards], seq_len=32, workers=1))
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir, key="loss"):
    return [(r["step"], r[key]) for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------------------------------------------------
# schedules and optimizer groups


def test_warmup_then_cosine_reaches_min_lr_at_the_last_step():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)           # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)          # cosine from max to min
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                         # monotone decay


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert all(v == 1.0 for v in lrs[5:80])
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[-1] == pytest.approx(0.0)
    assert lr_at(50, 100, OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")) == 2.0


def test_decay_groups_exclude_norms_and_biases_and_count_tied_weights_once():
    from lmstack.model import build_model, preset

    model = build_model(preset("tiny", n_layer=2, d_model=64, n_head=4, bias=True, vocab_size=300))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    n_group = len(decay["params"]) + len(no_decay["params"])
    assert n_group == len(list(model.parameters()))                     # tied embedding/head listed once
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match=r"model\.n_layr.*did you mean 'model\.n_layer'"):
        TrainConfig(model={"preset": "tiny", "n_layr": 2})
    with pytest.raises(ConfigError, match="objective 'mlm' trains a 'encoder' model"):
        TrainConfig(objective="mlm", model={"preset": "tiny", "arch": "decoder"})
    with pytest.raises(ConfigError, match="pp_microbatches"):
        TrainConfig(batch_size=6, dist={"strategy": "pp", "pp_microbatches": 4})


# ---------------------------------------------------------------------------------------------------------
# objectives


def test_mlm_masks_fifteen_percent_with_80_10_10_split():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (64, 256))
    inputs, labels = mlm_mask(x, mask_id=100, vocab_size=100, probability=0.15, generator=g)
    picked = labels != -100
    assert picked.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[picked], x[picked])                       # targets are the original tokens
    assert torch.equal(inputs[~picked], x[~picked])                     # unpicked tokens untouched
    masked = (inputs[picked] == 100).float().mean().item()
    kept = (inputs[picked] == x[picked]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1 + 0.1 / 100, abs=0.03)
    # the same generator seed gives the same mask (resume draws what the original run drew)
    again = mlm_mask(x, 100, 100, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_span_corruption_round_trips_to_the_original_text():
    ids = special_ids("span", base_vocab=50, seq_len=40, density=0.15, mean_len=3.0)
    n_noise, n_spans = span_counts(40, 0.15, 3.0)
    assert (n_noise, n_spans) == (6, 2) and ids.n_sentinels == 2 and ids.vocab_size == 53
    x = torch.randint(0, 50, (3, 40))
    enc, dec, labels = span_corrupt(x, ids, 0.15, 3.0, torch.Generator().manual_seed(1))
    assert enc.shape == (3, 40 - n_noise + n_spans) and labels.shape == dec.shape == (3, n_noise + n_spans)
    assert torch.equal(dec[:, 1:], labels[:, :-1]) and (dec[:, 0] == ids.decoder_start).all()
    for row in range(3):
        spans, cur = {}, None
        for t in labels[row].tolist():
            if t >= ids.first_sentinel:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [tok for t in enc[row].tolist() for tok in (spans[t] if t >= ids.first_sentinel else [t])]
        assert rebuilt == x[row].tolist()
        assert sorted(spans) == [50, 51]                                 # each sentinel once, in order


def test_step_generators_differ_per_step_microstep_and_rank():
    draws = {tuple(torch.rand(4, generator=step_generator(0, s, m, r)).tolist())
             for s in range(3) for m in range(2) for r in range(2)}
    assert len(draws) == 12


# ---------------------------------------------------------------------------------------------------------
# the loop


def test_resume_gives_bit_identical_losses(tmp_path, shards):
    """Interrupt after step 6 (newest checkpoint: step 4), resume, finish: the log equals an uninterrupted run."""
    from lmstack.train.trainer import pretrain

    kw = dict(model={"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4, "dropout": 0.1}, keep_last=1)
    pretrain(tiny(tmp_path / "a", shards, **kw))
    cfg_b = tiny(tmp_path / "b", shards, **kw)
    assert pretrain(cfg_b, until=6) == {"stopped_at": 6}
    summary = pretrain(cfg_b, resume=True)
    assert summary["steps_this_run"] == 4                              # steps 5-8 again, from step 4
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 8 and a == b                                       # exact float equality
    assert losses(tmp_path / "a", "val_loss") == losses(tmp_path / "b", "val_loss")
    # keep_last=1 keeps the newest checkpoint plus the best-validation one
    kept = [p.name for p in list_checkpoints(tmp_path / "b")]
    best = read_json(tmp_path / "b" / "checkpoints" / kept[-1] / "state.json")["best_step"]
    assert kept[-1] == "step_00000008" and len(kept) <= 2 and f"step_{best:08d}" in kept
    from lmstack.model import load

    a_model, b_model = load(tmp_path / "a"), load(tmp_path / "b")
    for name, p in a_model.state_dict().items():
        assert torch.equal(p, b_model.state_dict()[name]), name


def test_gradient_accumulation_matches_the_big_batch(tmp_path, shards):
    """batch 8 x 1 micro-step == batch 4 x 2 micro-steps (same blocks, same mean loss and gradient)."""
    from lmstack.train.trainer import pretrain

    pretrain(tiny(tmp_path / "big", shards, batch_size=8, steps=4, eval_every=0))
    pretrain(tiny(tmp_path / "acc", shards, batch_size=4, grad_accum=2, steps=4, eval_every=0))
    big, acc = [v for _, v in losses(tmp_path / "big")], [v for _, v in losses(tmp_path / "acc")]
    assert acc == pytest.approx(big, abs=1e-5)


def test_activation_checkpointing_and_bf16_train_the_same_model(tmp_path, shards):
    from lmstack.train.trainer import pretrain

    pretrain(tiny(tmp_path / "plain", shards, steps=4, eval_every=0))
    pretrain(tiny(tmp_path / "ckpt", shards, steps=4, eval_every=0, activation_checkpointing=True))
    plain, ckpt = [v for _, v in losses(tmp_path / "plain")], [v for _, v in losses(tmp_path / "ckpt")]
    assert ckpt == pytest.approx(plain, abs=1e-6)                       # recomputation changes nothing
    pretrain(tiny(tmp_path / "bf16", shards, steps=4, eval_every=0, dtype="bf16"))
    bf16 = [v for _, v in losses(tmp_path / "bf16")]
    assert bf16 == pytest.approx(plain, abs=0.05) and bf16 != plain     # autocast on CPU: close, not equal


@pytest.mark.parametrize("objective", ["mlm", "span"])
def test_encoder_objectives_learn(tmp_path, shards, objective):
    from lmstack.train.trainer import pretrain

    model = {"preset": "tiny", "n_layer": 1, "d_model": 64, "n_head": 4}
    if objective == "span":
        model["n_encoder_layer"] = 1
    summary = pretrain(tiny(tmp_path / objective, shards, objective=objective, steps=16, eval_every=0,
                            ckpt_every=0, model=model))
    curve = [v for _, v in losses(tmp_path / objective)]
    assert sum(curve[-3:]) / 3 < curve[0] - 1.0, curve
    cfg = read_json(tmp_path / objective / "model_config.json")
    assert cfg["arch"] == {"mlm": "encoder", "span": "encoder-decoder"}[objective]
    assert cfg["vocab_size"] == (258 if objective == "mlm" else 257 + span_counts(32, 0.15, 3.0)[1] + 1)
    assert summary["val_loss"] is not None


def test_run_directory_has_everything(tmp_path, shards):
    from lmstack.train.trainer import pretrain

    summary = pretrain(tiny(tmp_path / "r", shards, steps=4, sample_prompts=["the "], sample_tokens=8, peak_tflops=0.0))
    run = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "model_config.json", "tokenizer.json",
                 "loss.png", "samples.md", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = next(r for r in read_jsonl(run / "metrics.jsonl") if "tokens_per_s" in r)
    assert row["tokens"] == 4 * 32 and row["tokens_per_s"] > 0 and 0 < row["mfu"]
    assert summary["samples"][0]["prompt"] == "the " and isinstance(summary["samples"][0]["text"], str)
    ckpt = list_checkpoints(run)[-1]
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "model_config.json", "optimizer.pt",
                                                "rng.pt", "state.json"}
    assert read_json(ckpt / "state.json")["loader"]["blocks_consumed"] == 4 * 4


def test_tiny_model_loss_falls_below_unigram_entropy_on_default_corpus(tmp_path):
    """The built-in corpus (its Python-reference 'topics' part), UTF-8 bytes, 120 steps of 8 x 64 tokens: the
    validation loss on the held-out documents falls well below the cross-entropy of a byte-unigram model fitted
    on the training documents (~3.3 nats/byte), so the model uses context."""
    import collections
    import json

    from lmstack.data.corpus import CorpusConfig, build_default_corpus
    from lmstack.train.trainer import pretrain

    # the raw topics (no cleaning steps; dedup only): this test is about the trainer, not the corpus
    build_default_corpus(tmp_path / "corpus", CorpusConfig(sources=("topics",), steps=()))

    def text_bytes(name):
        lines = (tmp_path / "corpus" / name).read_text().splitlines()
        return "".join(json.loads(x)["text"] for x in lines).encode()

    train_counts, valid = collections.Counter(text_bytes("train.jsonl")), text_bytes("valid.jsonl")
    total = sum(train_counts.values())
    unigram = -sum(math.log((train_counts[b] + 1) / (total + 256)) for b in valid) / len(valid)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=120, batch_size=8, log_every=10, eval_every=0,
                      eval_batches=4, ckpt_every=0, dtype="fp32", sample_prompts=[], peak_tflops=1.0,
                      model={"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4},
                      optim=OptimConfig(lr=3e-3, warmup_steps=10),
                      data=DataConfig(train=[str(tmp_path / "corpus" / "train.jsonl")],
                                      valid=[str(tmp_path / "corpus" / "valid.jsonl")], seq_len=64, workers=1))
    summary = pretrain(cfg)
    assert 3.0 < unigram < 3.6
    assert summary["val_loss"] < unigram - 0.3, (summary["val_loss"], unigram)


# ---------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli(monkeypatch):
    import lmstack.cli

    if "lmstack.train.cli" not in lmstack.cli.LAYER_CLIS:  # until the lead registers the layer
        monkeypatch.setattr(lmstack.cli, "LAYER_CLIS", [*lmstack.cli.LAYER_CLIS, "lmstack.train.cli"])
    return lmstack.cli.main


def test_cli_train_then_resume_longer(tmp_path, shards, capsys, cli):
    main = cli

    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps(dataclasses.asdict(tiny(tmp_path / "run", shards, steps=3)), default=str))
    assert main(["train", str(cfg), "--eval_every", "0", "--optim.lr", "5e-3"]) == 0
    assert "steps=3" in capsys.readouterr().out
    assert main(["train", "resume", str(tmp_path / "run"), "--steps", "5"]) == 0
    assert "steps=5" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert read_json(tmp_path / "run" / "config.json")["optim"]["lr"] == 5e-3
    assert main(["train", str(cfg), "--optim.lrr", "1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["train", "resume", str(tmp_path / "nowhere")]) == 2


def test_auto_resume_only_continues_the_same_config(tmp_path, shards, capsys):
    from lmstack.train.trainer import pretrain

    cfg = tiny(tmp_path / "r", shards, steps=4, eval_every=0, ckpt_every=2)
    pretrain(cfg, until=3)
    assert pretrain(cfg, resume="auto")["steps_this_run"] == 2                  # same config: from step 2
    other = dataclasses.replace(cfg, optim=OptimConfig(lr=5e-3, warmup_steps=2))
    assert pretrain(other, resume="auto")["steps_this_run"] == 4                # changed: from scratch
    assert "written with another config" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    bigger = dataclasses.replace(cfg, model={"preset": "tiny", "n_layer": 3, "d_model": 64, "n_head": 4})
    with pytest.raises(ConfigError, match="does not fit this run's model config"):
        pretrain(bigger, resume=True)
