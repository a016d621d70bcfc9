"""lmstack.train: pre-training (causal LM, masked LM, span corruption), scale-out, scaling laws.

    from lmstack.train import TrainConfig, pretrain
    summary = pretrain(TrainConfig(run_dir="runs/tiny", data={"train": ["corpus/train.jsonl"]}))

Modules, in the order the data flows::

    config.py       TrainConfig and its sections (optim, data, dist)
    data.py         the tokenizer and shard folders of data.train/valid (text packed, documents held out)
    objectives.py   loss functions: clm, mlm (BERT masking), span (T5 span corruption), distillation;
                    the one token-weighted held-out loss
    optim.py        AdamW decay groups, warmup + cosine/WSD schedules, gradient clipping
    distributed.py  torchrun world, DDP, FSDP2, tensor parallel (DTensor), pipeline parallel
    strategy.py     the Strategy object the loop calls (wrap, forward/backward, clip, eval, full state)
    samples.py      sample previews (a call of lmstack.infer.text); plots.py: loss.png
    trainer.py      the loop: accumulation, mixed precision, checkpoints/resume, eval, MFU; the Task hook
    scaling.py      sweeps and the Chinchilla fit
    cli.py          ``lmstack train``, ``lmstack scaling``
"""

from __future__ import annotations

from typing import Any

from lmstack.train.config import DataConfig, DistConfig, OptimConfig, TrainConfig

__all__ = ["TrainConfig", "OptimConfig", "DataConfig", "DistConfig", "pretrain", "resume_run", "Trainer",
           "fit_chinchilla", "ChinchillaFit", "SweepConfig", "run_sweep"]

_LAZY = {"pretrain": "trainer", "resume_run": "trainer", "Trainer": "trainer", "fit_chinchilla": "scaling",
         "ChinchillaFit": "scaling", "SweepConfig": "scaling", "run_sweep": "scaling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lmstack.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmstack.train' has no attribute {name!r}")
