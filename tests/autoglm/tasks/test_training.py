"""The shared training loop: schedule, early stopping, logging, accumulation, budgets, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from autoglm.config import TrainSettings
from autoglm.tasks import task_class
from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
from autoglm.tasks.digits import DigitsTask
from autoglm.tasks.predict import torch_predictor
from autoglm.tasks.training import fit, lr_at, make_optimizer

QUICK = dict(lr=3e-3, batch_size=32, max_steps=20, eval_every=10, eval_batches=2, warmup_frac=0.1)


@pytest.fixture
def digits(tmp_path):
    task = DigitsTask(cache_dir=tmp_path)
    return task, task.build_model(task.check_model_args({"channels": 8, "hidden": 32}))


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    settings = TrainSettings(lr=1e-3, min_lr_frac=0.1, warmup_frac=0.1, max_steps=101)

    lrs = [lr_at(step, settings) for step in range(101)]  # steps 0..100: the ones training takes

    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # end of warmup: the peak
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the decay
    assert lrs[100] == pytest.approx(1e-4)  # the last step taken ends the decay
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_applies_only_to_matrices(digits):
    task, model = digits

    groups = make_optimizer(model, TrainSettings(weight_decay=0.05)).param_groups

    assert groups[0]["weight_decay"] == 0.05 and all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_on_eval_returning_true_stops_at_once(digits):
    task, model = digits
    seen = []

    def stop_on_second(step, value):
        seen.append((step, value))
        return len(seen) == 2

    result = fit(task, model, TrainSettings(**QUICK | {"max_steps": 100, "eval_every": 5}), on_eval=stop_on_second)

    assert result.stopped_early and result.steps == 10
    assert result.history == seen and result.metric == seen[-1][1]


def test_json_lines_log_has_train_and_eval_lines(digits, tmp_path):
    task, model = digits
    log = tmp_path / "logs" / "train.jsonl"

    result = fit(task, model, TrainSettings(**QUICK), log_path=log)

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    evals = [line for line in lines if line["event"] == "eval"]
    trains = [line for line in lines if line["event"] == "train"]
    assert [(e["step"], e["metric"]) for e in evals] == [(10, "accuracy"), (20, "accuracy")]
    assert evals[-1]["value"] == result.metric and set(evals[-1]["metrics"]) == {"accuracy", "loss"}
    assert [t["step"] for t in trains] == [10, 20]
    for line in trains:
        assert line["batch_size"] == 32 and line["samples_per_s"] > 0 and line["lr"] > 0
        assert math.isfinite(line["loss"]) and line["time_s"] > 0


def test_gradient_accumulation_consumes_grad_accum_batches_per_step(digits):
    task, model = digits
    before = [p.detach().clone() for p in model.parameters()]

    result = fit(task, model, TrainSettings(**QUICK | {"grad_accum": 2}))

    assert result.steps == 20 and result.samples == 20 * 2 * 32
    assert math.isfinite(result.metric) and result.cpu_s > 0 and result.wall_s > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_time_budget_stops_training_and_still_evaluates(digits):
    task, model = digits

    result = fit(task, model, TrainSettings(**QUICK | {"max_steps": 100_000, "time_budget_s": 0.5}))

    assert 0 < result.steps < 100_000
    assert result.history[-1][0] == result.steps


def test_training_is_seeded_and_restores_the_model_mode(tmp_path):
    task = DigitsTask(cache_dir=tmp_path, seed=5)
    args = task.check_model_args({"channels": 8, "hidden": 32})
    first, second = task.build_model(args), task.build_model(args).eval()

    a = fit(task, first, TrainSettings(**QUICK))
    b = fit(task, second, TrainSettings(**QUICK))

    assert a.history == b.history
    assert first.training is True and second.training is False
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("trained_name", ["trained_digits", "trained_charlm"])
def test_checkpoint_round_trip_gives_identical_outputs(trained_name, request, tmp_path):
    trained = request.getfixturevalue(trained_name)
    task, model = trained.task, trained.model
    inputs = task.example_inputs(batch_size=4, model_args=model.model_args)

    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", task.name, model, metrics={"val": 1.5},
                           extra={"steps": trained.result.steps})
    loaded = load_checkpoint(path)
    rebuilt = loaded.build_model(task)

    assert loaded.task == task.name and loaded.model_args == model.model_args
    assert loaded.metrics == {"val": 1.5} and loaded.extra == {"steps": trained.result.steps}
    assert rebuilt.training is False and rebuilt.model_args == model.model_args
    np.testing.assert_array_equal(torch_predictor(rebuilt)(inputs), torch_predictor(model)(inputs))


def test_user_task_by_reference_trains_with_the_shared_loop(tmp_path):
    cls = task_class("tests.autoglm.tasks.user_task:LinearRegressionTask")
    task = cls(cache_dir=tmp_path)
    model = task.build_model(task.check_model_args({}))
    before = task.evaluate(torch_predictor(model), "val")["mse"]

    result = task.train(model, TrainSettings(lr=5e-2, weight_decay=0.0, batch_size=32, max_steps=300,
                                             eval_every=100, warmup_frac=0.0))

    after = task.evaluate(torch_predictor(model), "test")["mse"]
    assert cls.__name__ == "LinearRegressionTask" and task.name == "linreg"
    assert [step for step, _ in result.history] == [100, 200, 300]
    assert after < before / 50 and after < 0.05  # noise variance is 0.01
    np.testing.assert_allclose(model.weight.detach().numpy()[0], [1.5, -2.0, 0.5, 3.0], atol=0.05)
