"""The report's hypervolume and its curve over trials (Optuna's private implementation as the oracle)."""

import numpy as np
import optuna
import pytest
from optuna._hypervolume import compute_hypervolume

from tune.early_stop import pareto_fronts
from tune.report import hypervolume, hypervolume_history


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


def test_the_hypervolume_of_a_hand_drawn_staircase():
    points = np.array([[0.0, 0.5], [0.5, 0.0], [0.6, 0.6], [1.2, -1.0]])  # one dominated, one outside the box

    assert hypervolume(points, np.array([1.0, 1.0])) == pytest.approx(0.75)
    assert hypervolume(points[:0], np.array([1.0, 1.0])) == 0.0
    assert hypervolume(np.array([[0.2], [0.4]]), np.array([1.0])) == pytest.approx(0.8)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_the_hypervolume_equals_optunas_with_dominated_and_repeated_points(dims):
    rng = np.random.default_rng(dims)
    points = rng.random((40, dims))
    points[5] = points[4]
    reference = np.full(dims, 1.1)
    front = points[pareto_fronts(points.tolist())[0]]

    assert hypervolume(points, reference) == pytest.approx(compute_hypervolume(front, reference))
    assert hypervolume(front, reference) == pytest.approx(compute_hypervolume(front, reference))
