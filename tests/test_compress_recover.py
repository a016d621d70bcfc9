"""Recovery fine-tuning of a pruned model through the one trainer (``TrainConfig.init_from``): it lowers the
held-out loss, keeps the pruned shape, resumes exactly, its config reloads, and bad requests are one line."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

import lmstack.model as lm
from lmstack.compress.prune_structured import prune_structured
from lmstack.train.recover import recover, recovery_config
from lmstack.errors import ConfigError
from lmstack.model import build_model, preset
from lmstack.train.config import TrainConfig, load_train_config

WORDS = "the cat dog sat ran on a mat log and then saw big small red".split()


def _text(path, n, seed):
    rng = random.Random(seed)
    # a little grammar, so there is something to learn: subject verb "on" object "."
    lines = [f"the {rng.choice(['cat', 'dog'])} {rng.choice(['sat', 'ran'])} on a {rng.choice(['mat', 'log'])}."
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def pruned(tmp_path):
    """A small decoder with the byte tokenizer, structurally pruned, saved as an lmstack folder; and text."""
    from lmstack.train.data import byte_tokenizer

    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=257, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                               max_seq_len=64))
    small, _ = prune_structured(model, heads=0.5, neurons=0.25)
    lm.save(small, tmp_path / "p")
    byte_tokenizer().save(tmp_path / "p")
    return tmp_path / "p", _text(tmp_path / "train.txt", 400, 1), _text(tmp_path / "valid.txt", 60, 2)


def test_recovery_lowers_the_held_out_loss_and_keeps_the_pruned_shape(pruned, tmp_path):
    folder, train, valid = pruned
    start = lm.load(folder)
    model, info = recover(folder, [str(train)], [str(valid)], steps=30, run_dir=tmp_path / "run", lr=3e-3,
                          batch_size=4, seq_len=32, dtype="fp32", threads=1)
    assert info["val_loss_after"] < info["val_loss_before"] - 0.5
    assert (model.config.n_head, model.config.n_kv_head, model.config.d_ff) == (2, 1, 48)
    assert model.config == start.config
    # the run's held-out loss before the first step is the pruned model's own CLM loss: it started from the folder
    from lmstack.train.objectives import heldout_loss
    from lmstack.train.trainer import Trainer

    trainer = Trainer(load_train_config(tmp_path / "run" / "config.json"))
    assert torch.equal(trainer.module.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)
    assert trainer.evaluate()["val_loss"] == pytest.approx(info["val_loss_before"], rel=1e-6)
    from lmstack.data.loader import validation_batches
    batches = list(validation_batches(trainer.data.valid, 32, 4, max_batches=20))
    assert heldout_loss(start, batches) == pytest.approx(info["val_loss_before"], rel=1e-5)
    trainer.close()
    final = lm.load(tmp_path / "run")
    assert final.config == start.config
    assert torch.equal(final.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_the_recovery_config_reloads_and_resumes_exactly(pruned, tmp_path):
    from lmstack.train.trainer import pretrain, resume_run

    folder, train, valid = pruned
    kw = dict(lr=3e-3, batch_size=2, seq_len=16, dtype="fp32", threads=1, ckpt_every=2)
    cfg = recovery_config(folder, [str(train)], [str(valid)], steps=4, run_dir=tmp_path / "a", **kw)
    assert cfg.init_from == str(folder) and cfg.model == {}
    whole = pretrain(cfg)
    again = load_train_config(tmp_path / "a" / "config.json")
    assert again == cfg
    cut = recovery_config(folder, [str(train)], [str(valid)], steps=4, run_dir=tmp_path / "b", **kw)
    assert pretrain(cut, until=2) == {"stopped_at": 2}
    resumed = resume_run(tmp_path / "b")
    assert resumed["train_loss"] == whole["train_loss"] and resumed["val_loss"] == whole["val_loss"]


def test_init_from_is_validated_at_the_edge(pruned, tmp_path):
    folder, train, valid = pruned
    with pytest.raises(ConfigError, match=r"^model: init_from=.* takes the model's config from that folder; drop"):
        TrainConfig(init_from=str(folder), model={"preset": "tiny", "n_layer": 2})
    with pytest.raises(ConfigError, match=r"^init_from: objective 'mlm' is not supported"):
        TrainConfig(init_from=str(folder), model={}, objective="mlm")
    from lmstack.train.trainer import Trainer

    cfg = recovery_config(folder, [str(train)], [str(valid)], steps=2, run_dir=tmp_path / "r", seq_len=128)
    with pytest.raises(ConfigError, match=r"^data.seq_len=128 is longer than the max_seq_len=64 of init_from"):
        Trainer(cfg)
    from lmstack.compress import QuantConfig, quantize_model, save_quantized

    q = lm.load(folder)
    quantize_model(q, QuantConfig("int8"))
    save_quantized(q, tmp_path / "q")
    (tmp_path / "q" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    cfg = recovery_config(tmp_path / "q", [str(train)], None, steps=2, run_dir=tmp_path / "r2", seq_len=16)
    with pytest.raises(ConfigError, match=r"^init_from: .* is a quantized model; training needs float weights"):
        Trainer(cfg)


def _cli(argv):
    from lmstack.compress.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prune_with_recovery_writes_the_recovered_model(tmp_path, capsys):
    from lmstack.train.data import byte_tokenizer

    torch.manual_seed(0)
    lm.save(build_model(preset("tiny", vocab_size=257, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                               max_seq_len=64)), tmp_path / "m")
    byte_tokenizer().save(tmp_path / "m")
    train, valid = _text(tmp_path / "train.txt", 400, 1), _text(tmp_path / "valid.txt", 60, 2)
    assert _cli(["compress", "prune", str(tmp_path / "m"), "--heads", "0.5", "--neurons", "0.25", "--out",
                 str(tmp_path / "p"), "--recover-steps", "20", "--recover-text", str(train), "--recover-valid",
                 str(valid), "--recover-lr", "3e-3", "--recover-seq-len", "32", "--recover-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "recovered: 20 steps" in out and str(tmp_path / "p-recovery") in out
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    rec = report["recovery"]
    assert rec["val_loss_after"] < rec["val_loss_before"]
    recovered, run = lm.load(tmp_path / "p"), lm.load(tmp_path / "p-recovery")
    assert recovered.config.n_head == 2
    assert torch.equal(recovered.blocks[1].ffn.down.weight, run.blocks[1].ffn.down.weight)


@pytest.mark.parametrize("extra,message", [
    (["--recover-steps", "5"], "prune: --recover-steps needs training text; pass --recover-text FILES"),
    (["--recover-steps", "5", "--recover-text", "t.txt", "--unstructured", "0.5"],
     "prune: --recover-steps trains every weight and would refill the zeroed ones"),
    (["--recover-steps", "-1"], "prune: --recover-steps must be >= 0"),
])
def test_cli_recovery_errors_are_one_line(pruned, tmp_path, extra, message):
    folder, _, _ = pruned
    with pytest.raises(ConfigError, match="^" + message):
        _cli(["compress", "prune", str(folder), "--heads", "0.5", "--out", str(tmp_path / "x"), *extra])


# ---------------------------------------------------------------------------------------------------------
# sequence-level KD data


def test_distill_data_writes_the_teachers_greedy_continuations_and_train_reads_them(pruned, tmp_path, capsys):
    from lmstack.infer import GenerationConfig
    from lmstack.infer.text import complete, load_run
    from lmstack.train.trainer import pretrain

    folder, _, _ = pruned
    (tmp_path / "prompts.txt").write_text("the cat\n\nthe dog sat\n")
    out = tmp_path / "kd.jsonl"
    assert _cli(["compress", "distill-data", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "12", "--batch-size", "1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "the dog sat"]
    model, tok = load_run(folder)
    for r in rows:      # exactly what the engine decodes for that prompt alone
        want = complete(model, tok, r["prompt"], GenerationConfig(max_new_tokens=12))
        assert r["completion"] == want.text and r["text"] == r["prompt"] + want.text
    cfg = TrainConfig(run_dir=str(tmp_path / "student"), steps=2, batch_size=1, dtype="fp32", threads=1,
                      model={"preset": "tiny", "d_model": 32, "n_layer": 1, "n_head": 2}, eval_every=0,
                      sample_prompts=[], data={"train": [str(out)], "tokenizer": str(folder), "seq_len": 8,
                                               "valid_fraction": 0.0})
    assert pretrain(cfg)["steps"] == 2


def test_distill_data_bad_input_is_one_line(pruned, tmp_path):
    folder, _, _ = pruned
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "p.txt").write_text("a\n")
    cases = [(["--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "a.jsonl")], "no prompts found"),
             (["--prompts", str(tmp_path / "p.txt"), "--samples", "3", "--out", str(tmp_path / "b.jsonl")],
              "--samples: greedy decoding gives one continuation per prompt; set --temperature > 0"),
             (["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "c.txt")], "name a .jsonl file")]
    from lmstack.errors import LmstackError

    for extra, message in cases:
        with pytest.raises(LmstackError, match=message):
            _cli(["compress", "distill-data", str(folder), *extra])
