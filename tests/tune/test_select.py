"""Selection from the Pareto front: constraints first, then weights; a clear error when nothing qualifies."""

import pytest

from autoglm.config import TuneSettings
from autoglm.errors import AutoGLMError
from tune.select import Point, select


def point(trial: int, metric: float, latency: float, energy: float) -> Point:
    return Point(trial, {"metric": metric, "latency": latency, "energy": energy}, {}, f"trials/{trial:04d}/model.pt",
                 {}, "fp32")


# an accuracy front: more accurate costs more time and energy
FRONT = [point(0, 0.990, 4.0, 4e-4), point(1, 0.988, 1.0, 1e-4), point(2, 0.985, 0.9, 9e-5),
         point(3, 0.950, 0.5, 5e-5)]


def test_the_metric_constraint_removes_points_too_far_from_the_best():
    chosen, why = select(FRONT, TuneSettings(max_metric_loss=0.01), "maximize")

    # trial 3 is 4% worse; trial 1 gives up 0.2 points for a 4x faster model, trial 2 0.5 for little more
    assert chosen.trial == 1
    assert set(why["rejected"]) == {3} and why["best_metric"] == 0.990


def test_the_weights_decide_among_the_points_that_meet_the_constraints():
    metric_only = TuneSettings(max_metric_loss=1.0, weights={"metric": 1.0, "latency": 0.0, "energy": 0.0})
    speed_only = TuneSettings(max_metric_loss=1.0, weights={"metric": 0.0, "latency": 1.0, "energy": 0.0})

    assert select(FRONT, metric_only, "maximize")[0].trial == 0
    assert select(FRONT, speed_only, "maximize")[0].trial == 3


def test_latency_and_energy_caps_are_constraints():
    slo = TuneSettings(max_metric_loss=1.0, latency_slo_ms=0.8, weights={"metric": 1.0})
    joules = TuneSettings(max_metric_loss=1.0, max_joules=2e-4, weights={"metric": 1.0})

    chosen_slo, why = select(FRONT, slo, "maximize")
    chosen_joules, _ = select(FRONT, joules, "maximize")

    assert chosen_slo.trial == 3 and "over the SLO" in why["rejected"][0]
    assert chosen_joules.trial == 1


def test_a_minimized_metric_measures_loss_upwards():
    losses = [point(0, 1.500, 3.0, 3e-4), point(1, 1.505, 1.0, 1e-4), point(2, 1.510, 0.95, 9.5e-5),
              point(3, 1.800, 0.2, 1e-5)]

    chosen, why = select(losses, TuneSettings(max_metric_loss=0.01), "minimize")

    assert chosen.trial == 1 and set(why["rejected"]) == {3}


def test_no_candidate_is_a_clear_error_naming_what_to_relax():
    impossible = TuneSettings(latency_slo_ms=0.01)

    with pytest.raises(AutoGLMError) as error:
        select(FRONT, impossible, "maximize")

    assert "no Pareto-optimal trial meets the selection constraints" in str(error.value)
    assert "tune.latency_slo_ms" in str(error.value)


def test_an_empty_front_is_a_clear_error():
    with pytest.raises(AutoGLMError, match="no trial completed"):
        select([], TuneSettings(), "maximize")
