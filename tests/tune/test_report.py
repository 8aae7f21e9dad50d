"""The report's hypervolume-over-trials curve."""

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from tune.early_stop import pareto_fronts
from tune.report import hypervolume_history


def _study(points, directions):
    study = optuna.create_study(directions=directions)
    for values in points:
        study.add_trial(optuna.trial.create_trial(values=list(values)))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))  # not a point
    return study


def test_the_curve_equals_the_hypervolume_of_each_prefix_front_and_never_falls():
    rng = np.random.default_rng(0)
    points = rng.random((60, 3))
    points[10] = points[9]  # a repeat changes nothing
    directions = ["maximize", "minimize", "minimize"]

    history = hypervolume_history(_study(points, directions))

    signed = points * np.array([-1.0, 1.0, 1.0])
    norm = (signed - signed.min(axis=0)) / np.ptp(signed, axis=0)
    expected = [compute_hypervolume(norm[:i + 1][pareto_fronts(norm[:i + 1].tolist())[0]], np.full(3, 1.1))
                for i in range(len(points))]
    assert [n for n, _ in history] == list(range(60))
    assert [v for _, v in history] == pytest.approx(expected)
    assert all(b >= a for (_, a), (_, b) in zip(history, history[1:]))
