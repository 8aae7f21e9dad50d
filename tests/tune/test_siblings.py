"""Compression siblings: a new best trial's trained model queued under the other quantization modes."""

import optuna
import pytest

from autoglm.tasks import Knob
from tune.siblings import CompressionSiblings, sibling_params

SPACE = {"train.lr": Knob("float", 1e-3, low=1e-4, high=1e-2, log=True),
         "quantize.mode": Knob("categorical", "none", choices=("none", "dynamic", "static")),
         "prune.ratio": Knob("float", 0.0, low=0.0, high=0.5, step=0.25)}
DIRS = ["maximize", "minimize", "minimize"]


def test_siblings_are_every_quantization_mode_with_pruning_off_except_the_trial_itself():
    pruned = {"train.lr": 3e-3, "quantize.mode": "static", "prune.ratio": 0.25}
    plain = {"train.lr": 3e-3, "quantize.mode": "none", "prune.ratio": 0.0}

    assert sibling_params(pruned, SPACE) == [{"train.lr": 3e-3, "quantize.mode": m, "prune.ratio": 0.0}
                                             for m in ("none", "dynamic", "static")]
    assert [p["quantize.mode"] for p in sibling_params(plain, SPACE)] == ["dynamic", "static"]
    fixed_mode = {**SPACE, "quantize.mode": "dynamic"}  # not searched: only pruning is turned off
    assert sibling_params({"train.lr": 3e-3, "prune.ratio": 0.5}, fixed_mode) == \
        [{"train.lr": 3e-3, "prune.ratio": 0.0}]


def test_a_mode_that_fine_tunes_has_no_siblings():
    space = {**SPACE, "quantize.mode": Knob("categorical", "none", choices=("none", "static", "qat"))}

    assert [p["quantize.mode"] for p in sibling_params({"quantize.mode": "qat", "prune.ratio": 0.25}, space)] == \
        ["none", "static"]  # a QAT sibling would cost a fine-tune, not a compression


def told(study, params, metric, values=None, **attrs):
    """A finished trial with ``params``, added as another worker would have finished it."""
    dists = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "quantize.mode": optuna.distributions.CategoricalDistribution(SPACE["quantize.mode"].choices),
             "prune.ratio": optuna.distributions.FloatDistribution(0.0, 0.5, step=0.25)}
    study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                              values=values or (metric, 1.0, 1.0),
                                              user_attrs={"objectives": {"metric": metric, "latency": 1.0}, **attrs}))
    return study.trials[-1]


@pytest.fixture
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=DIRS)


def waiting(study) -> list[tuple[dict, dict]]:
    """Queued trials: (their fixed parameters, user attributes)."""
    return [(t.system_attrs["fixed_params"], t.user_attrs) for t in study.trials if t.state.name == "WAITING"]


def test_only_a_new_best_trial_queues_its_siblings_once(study):
    callback = CompressionSiblings(SPACE, "maximize")
    best = told(study, {"train.lr": 3e-3, "quantize.mode": "static", "prune.ratio": 0.0}, 0.95)
    callback(study, best)
    assert [(params["quantize.mode"], attrs["sibling_of"]) for params, attrs in waiting(study)] == \
        [("none", best.number), ("dynamic", best.number)]
    callback(study, best)  # already queued: not again
    assert len(waiting(study)) == 2

    worse = told(study, {"train.lr": 1e-3, "quantize.mode": "static", "prune.ratio": 0.0}, 0.90)
    callback(study, worse)
    sibling = told(study, {"train.lr": 2e-3, "quantize.mode": "none", "prune.ratio": 0.0}, 0.99, sibling_of=0)
    callback(study, sibling)  # a sibling never queues siblings of its own
    assert {params["train.lr"] for params, _ in waiting(study)} == {3e-3}


def test_a_minimized_metric_and_a_space_without_compression_knobs(study):
    loss = CompressionSiblings(SPACE, "minimize")
    first = told(study, {"train.lr": 3e-3, "quantize.mode": "none", "prune.ratio": 0.0}, 2.0)
    higher = told(study, {"train.lr": 1e-3, "quantize.mode": "none", "prune.ratio": 0.0}, 2.5)
    loss(study, higher)
    assert not waiting(study)
    loss(study, first)
    assert len(waiting(study)) == 2
    CompressionSiblings({"train.lr": SPACE["train.lr"]}, "maximize")(study, first)
    assert len(waiting(study)) == 2


def test_the_best_is_judged_by_the_task_metric_whatever_the_objectives_order():
    study = optuna.create_study(directions=["minimize", "maximize"])  # tune.objectives = ["latency", "metric"]
    callback = CompressionSiblings(SPACE, "maximize")
    static = {"quantize.mode": "static", "prune.ratio": 0.0}
    slow_best = told(study, {"train.lr": 3e-3, **static}, 0.95, values=(9.0, 0.95))
    fast_worse = told(study, {"train.lr": 1e-3, **static}, 0.90, values=(1.0, 0.90))
    callback(study, fast_worse)
    assert not waiting(study)
    callback(study, slow_best)
    assert {params["train.lr"] for params, _ in waiting(study)} == {3e-3}


def test_no_more_siblings_are_queued_than_the_study_will_still_run(study):
    best = told(study, {"train.lr": 3e-3, "quantize.mode": "static", "prune.ratio": 0.25}, 0.95)
    CompressionSiblings(SPACE, "maximize", room=lambda s: 2)(study, best)
    assert [params["quantize.mode"] for params, _ in waiting(study)] == ["none", "dynamic"]
    better = told(study, {"train.lr": 1e-3, "quantize.mode": "none", "prune.ratio": 0.0}, 0.97)
    CompressionSiblings(SPACE, "maximize", room=lambda s: 2)(study, better)  # two already queued: no room
    assert len(waiting(study)) == 2
