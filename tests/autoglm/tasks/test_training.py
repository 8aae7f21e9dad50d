"""The shared training loop: optimizers, schedules, early stopping, logging, accumulation, budgets, checkpoints,
feedback metrics (gradient noise scale, curvature) and adaptive batch size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from autoglm.config import TrainSettings, load_settings
from autoglm.errors import ConfigError
from autoglm.tasks import task_class, training
from autoglm.tasks.checkpoint import load_checkpoint, save_checkpoint
from autoglm.tasks.digits import DigitsTask
from autoglm.tasks.predict import torch_predictor
from autoglm.tasks.training import OneProcess, fit, lr_at, make_optimizer, noise_scale, top_hessian_eigenvalue

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


# ---- optimizer and schedule knobs -----------------------------------------------------------------


def _cosine_before_the_knobs(step: int, s: TrainSettings) -> float:
    """The schedule as it was before train.schedule existed: a default run must keep it to the last bit."""
    warmup = int(s.warmup_frac * s.max_steps)
    if step < warmup:
        return s.lr * (step + 1) / (warmup + 1)
    min_lr = s.lr * s.min_lr_frac
    progress = min(1.0, (step - warmup) / max(1, s.max_steps - 1 - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (s.lr - min_lr)


@pytest.fixture
def captured(monkeypatch):
    """The optimizer each fit() builds."""
    made = []

    def capture(model, settings):
        made.append(make_optimizer(model, settings))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", capture)
    return made


def test_a_default_run_keeps_adamw_and_the_cosine_schedule_exactly(digits, tmp_path, captured):
    task, model = digits
    settings = TrainSettings(**QUICK)
    log = tmp_path / "train.jsonl"

    fit(task, model, settings, log_path=log)

    assert (settings.optimizer, settings.schedule) == ("adamw", "cosine")
    assert type(captured[0]) is torch.optim.AdamW
    assert captured[0].defaults["betas"] == (0.9, 0.99) and captured[0].defaults["lr"] == 3e-3
    assert [lr_at(step, settings) for step in range(20)] == [_cosine_before_the_knobs(s, settings) for s in range(20)]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    expected = [_cosine_before_the_knobs(s, settings) for s in (9, 19)]
    assert [r["lr"] for r in logged if r["event"] == "train"] == expected
    default = TrainSettings(max_steps=2000)
    assert all(lr_at(s, default) == _cosine_before_the_knobs(s, default) for s in range(0, 2000, 7))


def test_an_sgd_run_uses_nesterov_momentum_buffers(digits, captured):
    task, model = digits

    fit(task, model, TrainSettings(**QUICK | {"optimizer": "sgd", "momentum": 0.8, "lr": 0.05}))

    optimizer = captured[0]
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.8
    buffers = [optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups for p in g["params"]]
    assert len(buffers) == len(list(model.parameters())) and all(b.abs().sum() > 0 for b in buffers)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_an_adafactor_run_trains(digits, captured):
    task, model = digits
    before = [p.detach().clone() for p in model.parameters()]

    result = fit(task, model, TrainSettings(**QUICK | {"optimizer": "adafactor", "lr": 1e-2}))

    assert type(captured[0]) is torch.optim.Adafactor and captured[0].state
    assert math.isfinite(result.metric) and result.steps == 20
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_step_schedule_decays_by_gamma_at_each_interval_after_warmup():
    settings = TrainSettings(lr=1.0, warmup_frac=0.1, max_steps=100, schedule="step", step_gamma=0.5, step_every=0.3)

    lrs = [lr_at(step, settings) for step in range(100)]  # warmup 10 steps, then an interval of 30 steps

    assert lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == lrs[39] == 1.0
    assert lrs[40] == lrs[69] == 0.5
    assert lrs[70] == lrs[99] == 0.25


def test_the_linear_schedule_decays_in_a_straight_line_to_min_lr():
    settings = TrainSettings(lr=1.0, min_lr_frac=0.1, warmup_frac=0.1, max_steps=101, schedule="linear")

    lrs = [lr_at(step, settings) for step in range(101)]

    assert lrs[10] == 1.0 and lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.55)
    np.testing.assert_allclose(np.diff(lrs[10:]), -0.9 / 90)


def test_the_constant_schedule_holds_lr_after_warmup():
    settings = TrainSettings(lr=2.0, warmup_frac=0.1, max_steps=50, schedule="constant")

    lrs = [lr_at(step, settings) for step in range(50)]

    assert lrs[0] == pytest.approx(2.0 / 6) and lrs[4] < 2.0
    assert set(lrs[5:]) == {2.0}


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=lion", "'adamw', 'sgd' or 'adafactor'"),
    ("train.schedule=onecycle", "'cosine', 'linear', 'step' or 'constant'"),
    ("train.step_gamma=0", "train.step_gamma"),
    ("train.momentum=1.0", "train.momentum"),
    ("train.adaptive_batch=true", "set train.feedback_every > 0"),
])
def test_bad_optimizer_and_feedback_settings_are_refused_naming_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(overrides=[override])


def test_adaptive_batch_needs_room_to_grow():
    with pytest.raises(ConfigError, match="max_grad_accum >= train.grad_accum"):
        load_settings(overrides=["train.feedback_every=5", "train.adaptive_batch=true", "train.grad_accum=4",
                                 "train.max_grad_accum=2"])


# ---- feedback: gradient noise scale, curvature, adaptive batch -------------------------------------


def test_the_noise_scale_estimator_recovers_a_known_gradient_noise():
    # y = w* . x + noise, x ~ N(0, I_d), loss 1/2 (w . x - y)^2 at w = w* + r: the per-example gradient
    # x x^T r - x noise has mean G = r and covariance (|r|^2 + s^2) I + r r^T
    d, sigma, b_small, accum = 8, 0.5, 4, 4
    generator = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, generator=generator)
    r = 0.3 * torch.randn(d, generator=generator)
    w = (w_true + r).requires_grad_()
    true_g2 = float(r @ r)
    true_trace = d * (true_g2 + sigma ** 2) + true_g2

    estimates = []
    for _ in range(3000):
        grads = []
        for _ in range(accum):
            x = torch.randn(b_small, d, generator=generator)
            y = x @ w_true + sigma * torch.randn(b_small, generator=generator)
            (grad,) = torch.autograd.grad(0.5 * ((x @ w - y) ** 2).mean(), w)
            grads.append(grad)
        big = torch.stack(grads).mean(0)
        estimates.append(noise_scale([float(g @ g) for g in grads], float(big @ big), b_small, b_small * accum))
    g2, trace = np.mean(estimates, axis=0)

    assert g2 == pytest.approx(true_g2, rel=0.1)
    assert trace == pytest.approx(true_trace, rel=0.05)
    assert trace / g2 == pytest.approx(true_trace / true_g2, rel=0.15)


def test_the_training_log_measures_the_noise_of_a_task_whose_noise_is_known(tmp_path):
    # the linear-regression task draws training examples uniformly from 1000 fixed ones: G and Sigma at the
    # (barely moving) initial weights are the mean and covariance of the 1000 per-example gradients
    cls = task_class("tests.autoglm.tasks.user_task:LinearRegressionTask")
    task = cls(cache_dir=tmp_path)
    model = task.build_model(task.check_model_args({}))
    task.prepare()
    x, y = (torch.from_numpy(a) for a in task._splits["train"])
    residual = (x @ model.weight.detach()[0] + model.bias.detach() - y)
    per_example = 2 * residual[:, None] * torch.cat([x, torch.ones(len(y), 1)], 1)  # d(mse)/d(w, b)
    true_g2 = float(per_example.mean(0) @ per_example.mean(0))
    true_trace = float(per_example.var(0, unbiased=False).sum())
    log = tmp_path / "train.jsonl"
    settings = TrainSettings(lr=1e-9, weight_decay=0.0, batch_size=8, grad_accum=4, max_steps=400, eval_every=400,
                             warmup_frac=0.0, schedule="constant", feedback_every=1, grad_clip=0.0)

    fit(task, model, settings, log_path=log)

    feedback = [json.loads(line) for line in log.read_text().splitlines() if '"feedback"' in line]
    assert len(feedback) == 400 and all(r["feedback_s"] >= 0 and r["grad_accum"] == 4 for r in feedback)
    assert np.mean([r["grad_sq_norm"] for r in feedback]) == pytest.approx(true_g2, rel=0.1)
    assert np.mean([r["trace_sigma"] for r in feedback]) == pytest.approx(true_trace, rel=0.1)
    assert feedback[-1]["noise_scale"] == pytest.approx(true_trace / true_g2, rel=0.5)  # a moving average
    # the Hessian of the mean squared error of a linear model is 2 x^T x / n: positive, about 2 (1 + 1) here
    assert all(0 < r["hessian_top"] < 20 for r in feedback)


def test_the_hessian_estimate_finds_a_quadratics_top_eigenvalue():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5, -0.3, 0.1], dtype=torch.float64)) @ q.T
    b = torch.randn(6, dtype=torch.float64, generator=generator)
    x = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # linear in the loss: its Hessian block is 0

    top = top_hessian_eigenvalue(0.5 * x @ a @ x + b @ x + 3 * z.sum(), [x, z], iters=40)

    assert top == pytest.approx(5.0, rel=1e-6)
    assert x.grad is None and z.grad is None  # measuring leaves training's gradients alone


def test_feedback_lines_carry_noise_curvature_and_cost(digits, tmp_path):
    task, model = digits
    log = tmp_path / "train.jsonl"

    fit(task, model, TrainSettings(**QUICK | {"feedback_every": 5}), log_path=log)  # grad_accum 1: two halves

    feedback = [json.loads(line) for line in log.read_text().splitlines() if '"feedback"' in line]
    assert [r["step"] for r in feedback] == [5, 10, 15, 20]
    for record in feedback:
        assert record["noise_scale_step"] is None or math.isfinite(record["noise_scale_step"])
        assert math.isfinite(record["hessian_top"]) and record["feedback_s"] > 0
        assert {"grad_sq_norm", "trace_sigma", "noise_scale"} <= set(record)


def test_adaptive_batch_grows_accumulation_within_its_bounds(digits, tmp_path):
    task, model = digits
    log = tmp_path / "train.jsonl"
    settings = TrainSettings(**QUICK | {"batch_size": 4, "grad_accum": 2, "max_grad_accum": 3, "feedback_every": 2,
                                        "adaptive_batch": True})

    result = fit(task, model, settings, log_path=log)

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    changes = [r for r in lines if r["event"] == "batch"]
    accums = [r["grad_accum"] for r in lines if r["event"] == "feedback"]
    assert changes and [c["grad_accum"] for c in changes] == [3]  # the noise of 4-image batches is far above 12
    assert changes[0]["batch_size"] == 12 and changes[0]["noise_scale"] > 12
    assert min(accums) == 2 and max(accums) == 3 and accums == sorted(accums)
    assert result.samples < 20 * 3 * 4


def test_adaptive_batch_never_leaves_its_bounds():
    feedback = training._Feedback(TrainSettings(grad_accum=2, max_grad_accum=6, feedback_every=1,
                                                adaptive_batch=True))

    assert feedback.grad_accum(2, noise=1.0, batch_size=8) == 2  # small noise: never below grad_accum
    assert feedback.grad_accum(2, noise=40.0, batch_size=8) == 5
    assert feedback.grad_accum(5, noise=1e6, batch_size=8) == 6
    assert feedback.grad_accum(6, noise=8.0, batch_size=8) == 6  # grows only
    assert feedback.grad_accum(3, noise=None, batch_size=8) == 3


def test_feedback_is_refused_under_data_parallel_training(digits):
    task, model = digits

    class TwoRanks(OneProcess):
        world = 2

    with pytest.raises(ConfigError, match="train.feedback_every"):
        fit(task, model, TrainSettings(**QUICK | {"feedback_every": 5}), replicas=TwoRanks())
