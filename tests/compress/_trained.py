"""Tiny models trained once per test process (seconds each), shared by the compress tests.

Callers that change a model (pruning, fine-tuning) must deep-copy it first.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from autoglm.config import TrainSettings
from autoglm.tasks.charlm import CharLMTask
from autoglm.tasks.digits import DigitsTask
from autoglm.tasks.predict import onnx_predictor, torch_predictor

DIGITS_TRAIN = TrainSettings(lr=3e-3, weight_decay=0.01, batch_size=64, max_steps=250, eval_every=250,
                             eval_batches=5)
CHARLM_ARGS = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32}
CHARLM_TRAIN = TrainSettings(lr=3e-3, batch_size=16, max_steps=200, eval_every=200, eval_batches=2)


@functools.cache
def digits():
    """(task, trained DigitsCNN in eval mode): about 98% test accuracy."""
    task = DigitsTask()
    model = task.build_model({})
    task.train(model, DIGITS_TRAIN)
    return task, model.eval()


@functools.cache
def charlm():
    """(task, trained 2-layer 64-wide GPT in eval mode): val loss about 2.5 after 200 steps."""
    task = CharLMTask(cache_dir=Path(tempfile.mkdtemp(prefix="autoglm-test-charlm-")))
    model = task.build_model(CHARLM_ARGS)
    task.train(model, CHARLM_TRAIN)
    return task, model.eval()


def digits_metrics(predict) -> dict[str, float]:
    """Test-split accuracy and loss of any predictor (torch model or ONNX path)."""
    task, _ = digits()
    return task.evaluate(_predictor(predict), "test", n_batches=100, batch_size=64)


def charlm_loss(predict) -> float:
    """Val loss over 256 fixed windows, in one batch (one batch: the count does not depend on batching)."""
    task, model = charlm()
    metrics = task.evaluate(_predictor(predict), "val", n_batches=1, batch_size=256, model_args=model.model_args)
    return metrics["val_loss"]


def _predictor(predict):
    if isinstance(predict, str | Path):
        return onnx_predictor(predict, threads=1)
    if callable(getattr(predict, "parameters", None)):
        return torch_predictor(predict)
    return predict
