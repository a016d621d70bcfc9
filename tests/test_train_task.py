"""The trainer's Task hook with a task's own loss: dict batches, logged metrics, a task evaluate hook."""

import json

import torch

from lmstack.model import ModelConfig, build_model
from lmstack.train.config import DataConfig, OptimConfig, TrainConfig
from lmstack.train.trainer import Task, Trainer


class PairLoader:
    """Dict batches of two token rows per example (a stand-in for preference pairs)."""

    def __init__(self, seed: int = 0):
        self.seed, self.seen = seed, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.seen)
        self.seen += 1
        return {"chosen_input_ids": torch.randint(0, 32, (2, 8), generator=g),
                "rejected_input_ids": torch.randint(0, 32, (2, 8), generator=g)}, None

    def state_dict(self):  # JSON: the trainer writes it into the checkpoint's state.json
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def margin_loss(model, x, y, generator=None):
    # prefer "chosen" rows: raise their mean logit of token 0 over the "rejected" rows'
    good = model(x["chosen_input_ids"])[..., 0].mean()
    bad = model(x["rejected_input_ids"])[..., 0].mean()
    return -(good - bad), {"margin": good - bad, "const": torch.tensor(3.0)}


def test_task_loss_fn_trains_on_dict_batches_and_logs_its_metrics(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, max_seq_len=8))
    evaluated = []

    def evaluate(m):
        evaluated.append(m.training)
        return {"val_loss": 1.0 / (len(evaluated)), "pair_accuracy": 0.5}

    task = Task(model=model, loader=PairLoader(), eval_batches=lambda: [], loss_fn=margin_loss, evaluate=evaluate)
    cfg = TrainConfig(run_dir=str(tmp_path), steps=4, batch_size=2, grad_accum=2, eval_every=2, log_every=1,
                      sample_prompts=[], device="cpu", dtype="fp32", peak_tflops=1.0, model={"vocab_size": 32},
                      data=DataConfig(seq_len=8), optim=OptimConfig(lr=1e-2, warmup_steps=1))
    trainer = Trainer(cfg, task=task)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(abs(r["margin"] + r["loss"]) < 1e-6 and r["const"] == 3.0 for r in steps)
    assert steps[-1]["margin"] > steps[0]["margin"]                     # the task's loss was optimised
    assert steps[0]["tokens"] == 2 * 2 * 2 * 8                          # two dict tensors x accumulation 2
    evals = [r for r in rows if "pair_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and evaluated == [False, False]   # evaluated in eval mode
    assert summary["best_step"] == 4 and summary["eval"] == {"val_loss": 0.5, "pair_accuracy": 0.5}
