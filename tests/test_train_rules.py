"""The trainer's one-rule seams: the strategy object, the token-weighted held-out loss, the document-level
held-out split of text inputs, the atomic figure save, and distillation through the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmstack.runs import read_json, read_jsonl
from lmstack.train.config import DataConfig, OptimConfig, TrainConfig


def _texts(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the student learns what the teacher knows one token at a time from soft targets".split()
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(30)) for i in range(n)]


def _tiny(run_dir, train, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), steps=6, batch_size=4, log_every=1, eval_every=0, eval_batches=2,
                ckpt_every=0, sample_prompts=[], dtype="fp32", peak_tflops=1.0, threads=1,
                model={"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
                optim=OptimConfig(lr=1e-2, warmup_steps=1), data=DataConfig(train=train, seq_len=32, workers=1))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
    return path


# ---------------------------------------------------------------------------------------------------------
# the held-out split of text inputs: whole documents, by is_heldout


def test_text_inputs_split_documents_by_the_one_rule(tmp_path, corpus):
    from lmstack.data.pack import open_shards
    from lmstack.data.split import is_heldout
    from lmstack.train.data import byte_tokenizer, prepare_data
    from lmstack.train.distributed import DistEnv

    cfg = _tiny(tmp_path / "r", [str(corpus)], data=DataConfig(train=[str(corpus)], seq_len=32, workers=1,
                                                                   valid_fraction=0.2))
    data = prepare_data(cfg, tmp_path / "r", DistEnv())
    assert data.valid == tmp_path / "r" / "data" / "valid" and data.holdout == 0.0 and data.has_valid
    held = [t for t in _texts() if is_heldout(t, 0.2, cfg.data.split_seed)]
    kept = [t for t in _texts() if not is_heldout(t, 0.2, cfg.data.split_seed)]
    assert 0 < len(held) < len(kept)
    tok = byte_tokenizer()

    def stream(path):
        return [int(i) for a in open_shards(path).arrays for i in a]

    def packed(texts):
        return [i for t in texts for i in [*tok.encode(t), tok.eos_id]]

    # exactly the held-out documents, whole and in order, on the valid side; the rest on the train side
    assert stream(data.valid) == packed(held)
    assert stream(data.train) == packed(kept)
    assert open_shards(data.valid).index["documents"] == len(held)


def test_a_shard_folder_without_valid_keeps_the_loaders_block_tail(tmp_path):
    from lmstack.data.pack import pack_texts
    from lmstack.train.data import byte_tokenizer, prepare_data
    from lmstack.train.distributed import DistEnv

    pack_texts(_texts(), byte_tokenizer(), tmp_path / "shards", workers=1)
    data = prepare_data(_tiny(tmp_path / "r", [str(tmp_path / "shards")]), tmp_path / "r", DistEnv())
    assert (data.train, data.valid, data.holdout) == (tmp_path / "shards", None, 0.05)
    assert not (tmp_path / "r" / "data").exists()


def test_text_run_validates_on_held_out_documents_only(tmp_path, corpus):
    from lmstack.train.trainer import pretrain

    summary = pretrain(_tiny(tmp_path / "r", [str(corpus)], steps=2,
                             data=DataConfig(train=[str(corpus)], seq_len=32, workers=1, valid_fraction=0.2)))
    assert summary["val_loss"] is not None
    meta = read_json(tmp_path / "r" / "data" / "valid" / "index.json")["meta"]
    assert meta["split"] == {"side": "valid", "valid_fraction": 0.2, "seed": 1}


def test_no_held_out_document_warns_and_skips_validation(tmp_path, capsys):
    from lmstack.data.split import is_heldout
    from lmstack.train.trainer import pretrain

    texts = _texts(6)
    assert not any(is_heldout(t, 0.01, 1) for t in texts)
    docs = tmp_path / "few.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = pretrain(_tiny(tmp_path / "r", [str(docs)], steps=2,
                             data=DataConfig(train=[str(docs)], seq_len=32, workers=1, valid_fraction=0.01)))
    assert summary["val_loss"] is None
    assert not any("val_loss" in r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl"))
    assert ("[train] warning: no document of data.train fell in the held-out data.valid_fraction=0.01; no "
            "validation (give data.valid or raise data.valid_fraction)") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# one held-out loss


def test_heldout_loss_weights_batches_by_target_tokens():
    from lmstack.train.objectives import heldout_sums, loss_weight

    y1 = torch.tensor([[1, 2, -100, -100]])          # 2 target tokens, mean loss 1.0
    y2 = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # 8 target tokens, mean loss 4.0
    batches = [(torch.zeros_like(y1), y1), (torch.zeros_like(y2), y2)]
    means = {0: 1.0, 1: 4.0}
    total = heldout_sums(batches, lambda i, x, y: means[i])
    assert [loss_weight(x, y) for x, y in batches] == [2, 8]
    assert float(total[0] / total[1]) == pytest.approx((1.0 * 2 + 4.0 * 8) / 10)   # not (1 + 4) / 2 by rows


def test_sft_run_logs_the_heldout_loss_it_reports(tmp_path):
    """One SFT run: the trainer's last val_loss and the fine-tuning report's held-out loss are one number."""
    from lmstack.config import from_dict
    from lmstack.finetune.run import FinetuneConfig, finetune
    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import train_bpe

    rows = [{"instruction": f"what is {a} plus {b}?", "output": f"it is {a + b}" + " indeed" * (a % 3)}
            for a in range(12) for b in range(4)]
    tok = train_bpe([r["instruction"] + " " + r["output"] for r in rows], 300)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save(build_model(preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=96)),
         base)
    tok.save(base)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(FinetuneConfig, {
        "base": str(base), "method": "full", "run_dir": str(tmp_path / "ft"), "steps": 3, "batch_size": 4,
        "eval_every": 0, "log_every": 1, "ckpt_every": 0, "dtype": "fp32", "n_samples": 0, "lr": 1e-3,
        "data": {"train": [str(tmp_path / "sft.jsonl")], "valid_fraction": 0.25, "max_len": 64}})
    results = finetune(cfg)
    val = [r["val_loss"] for r in read_jsonl(tmp_path / "ft" / "metrics.jsonl") if "val_loss" in r]
    assert val
    assert round(val[-1], 4) == results["heldout_loss_after"]


# ---------------------------------------------------------------------------------------------------------
# the strategy object and the figure helper


def test_trainer_steps_through_the_strategy_object(tmp_path, corpus, monkeypatch):
    from lmstack.train import strategy as S
    from lmstack.train.trainer import Trainer

    calls = []
    real = S.Strategy.forward_backward

    def spy(self, *a, **k):
        calls.append(type(self).__name__)
        return real(self, *a, **k)

    monkeypatch.setattr(S.Strategy, "forward_backward", spy)
    trainer = Trainer(_tiny(tmp_path / "r", [str(corpus)], steps=2))
    assert type(trainer.strategy) is S.Strategy and trainer.module is trainer.strategy.module
    trainer.fit()
    trainer.close()
    assert calls == ["Strategy", "Strategy"]
    assert S.make_strategy(trainer.env, trainer.cfg.dist).holds_whole_model


def test_save_figure_writes_a_png_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmstack.runs import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "sub" / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]          # no temporary file left beside it
    assert not plt.fignum_exists(fig.number)


# ---------------------------------------------------------------------------------------------------------
# distillation on the trainer


@pytest.fixture
def cli(monkeypatch):
    import lmstack.cli

    if "lmstack.train.cli" not in lmstack.cli.LAYER_CLIS:
        monkeypatch.setattr(lmstack.cli, "LAYER_CLIS", [*lmstack.cli.LAYER_CLIS, "lmstack.train.cli"])
    return lmstack.cli.main


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    from lmstack.train.trainer import pretrain

    run = tmp_path_factory.mktemp("teacher") / "run"
    pretrain(_tiny(run, [str(corpus)], steps=40, model={"preset": "tiny", "n_layer": 2, "d_model": 64, "n_head": 4},
                   optim=OptimConfig(lr=1e-2, warmup_steps=2)))
    return run


def test_distill_through_the_cli_lowers_the_loss(tmp_path, corpus, teacher, cli, capsys):
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"run_dir": str(tmp_path / "s"), "steps": 12, "batch_size": 4, "log_every": 1,
                               "eval_every": 0, "ckpt_every": 0, "sample_prompts": [], "dtype": "fp32",
                               "peak_tflops": 1.0, "threads": 1,
                               "model": {"preset": "tiny", "n_layer": 1, "d_model": 32, "n_head": 2},
                               "optim": {"lr": 1e-2, "warmup_steps": 1},
                               "data": {"train": [str(corpus)], "seq_len": 32, "workers": 1}}))
    assert cli(["train", str(cfg), "--objective", "distill", "--teacher", str(teacher), "--kd_alpha", "0.9"]) == 0
    rows = [r["loss"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 12 and sum(rows[-3:]) / 3 < rows[0] - 0.5, rows
    summary = read_json(tmp_path / "s" / "summary.json")
    assert summary["objective"] == "distill" and summary["val_loss"] is not None
    from lmstack.model import load

    assert load(tmp_path / "s").config.vocab_size == load(teacher).config.vocab_size
    capsys.readouterr()
    assert cli(["train", str(cfg), "--objective", "distill", "--teacher", str(teacher), "--model.vocab_size", "300",
                "--run_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    teacher_vocab = load(teacher).config.vocab_size
    assert err == [(f"error: model.vocab_size=300, but the teacher {teacher} has vocab_size={teacher_vocab}; "
                    f"distillation needs the same vocabulary (drop model.vocab_size or set it to {teacher_vocab})")]


def test_distill_needs_a_teacher():
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^teacher: objective 'distill' needs a teacher model folder"):
        TrainConfig(objective="distill")
