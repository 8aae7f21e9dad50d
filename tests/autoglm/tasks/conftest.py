"""Fixtures for the task tests: trained models shared across modules (training is the slow part)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autoglm.config import TrainSettings
from autoglm.tasks import Task, TrainResult


@dataclass
class Trained:
    task: Task
    model: Any
    result: TrainResult
    seconds: float


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """Two threads only with passive OpenMP waiting: with the default spin-waiting, two threads on two
    cores shared with another busy process ran 2.5-10x slower per step than one thread."""
    import torch

    torch.set_num_threads(2 if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else 1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the session, so the built-in corpus is prepared once."""
    return tmp_path_factory.mktemp("cache")


def train(task: Task, model_args: dict, settings: TrainSettings, **kwargs) -> Trained:
    model = task.build_model(task.check_model_args(model_args))
    start = time.perf_counter()
    result = task.train(model, settings, **kwargs)
    return Trained(task, model, result, time.perf_counter() - start)


@pytest.fixture(scope="session")
def trained_digits(cache_dir) -> Trained:
    from autoglm.tasks.digits import DigitsTask

    settings = TrainSettings(lr=3e-3, weight_decay=0.01, batch_size=64, max_steps=300, warmup_frac=0.05,
                             eval_every=100, time_budget_s=30)
    return train(DigitsTask(cache_dir=cache_dir), {}, settings)


@pytest.fixture(scope="session")
def trained_charlm(cache_dir) -> Trained:
    """A small GPT at nanoGPT's CPU batch shape (12 x 64), trained for at most a minute."""
    from autoglm.tasks.charlm import CharLMTask

    settings = TrainSettings(lr=3e-3, batch_size=12, max_steps=600, warmup_frac=0.05, eval_every=100,
                             eval_batches=10, time_budget_s=60)
    model_args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}
    return train(CharLMTask(cache_dir=cache_dir), model_args, settings)


def export_onnx(trained: Trained, path: Path) -> Path:
    """Legacy (TorchScript) export with dynamic batch -- and sequence, where the input has one -- axes."""
    import torch

    task, model = trained.task, trained.model
    spec = task.io_spec(model.model_args)
    example = task.example_inputs(batch_size=2, model_args=model.model_args)
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    dynamic = {t.name: {0: "batch", **{i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.shape) if d == -1}}
               for t in spec.inputs + spec.outputs}
    model.eval()
    torch.onnx.export(model, args, str(path), input_names=[t.name for t in spec.inputs],
                      output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic, dynamo=False)
    return path
