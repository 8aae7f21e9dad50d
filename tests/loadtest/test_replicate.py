"""Replicated windows in a noisy study: per-config means, the front from them, which config a window
re-measures, and a TPE study that re-measures within its window budget (Triton and locust replaced by fakes)."""

import itertools

import pytest

from autoglm.config import LoadtestTuneSettings
from loadtest.replicate import config_means, front, next_replicate
from loadtest.space import TuneSpace
from loadtest.study import Objective, make_sampler, open_study, replicates_of, run_study, trial_rows, verify

from .test_tune import FakeWindow, Tracking

CAP, J = "capacity_per_instance_rps", "j_per_request"


def _row(trial, delay, capacity, joules, feasible=True, users=8, **extra):
    return {"trial": trial, "params": {"delay": delay}, CAP: capacity, J: joules, "feasible": feasible,
            "users": users, **extra}


def test_a_configs_value_is_the_mean_of_its_windows_a_miss_counting_zero():
    rows = [_row(0, 0, 1000, 0.02, users=4), _row(1, 500, 3000, 0.01), _row(2, 0, 2000, 0.04, users=8),
            _row(3, 0, 0, 0.03, feasible=False)]
    means = {c["params"]["delay"]: c for c in config_means(rows, CAP, J)}

    zero = means[0]
    assert zero[CAP] == pytest.approx(1000) and zero[J] == pytest.approx(0.03)
    assert zero["windows"] == 3 and zero["feasible_windows"] == 2 and zero["trials"] == [0, 2, 3]
    assert zero["window_capacities"] == [1000, 2000, 0.0] and zero["trial"] == 0
    assert zero["users"] == 4  # the feasible window nearest the mean sets the concurrency verification uses
    assert means[500]["windows"] == 1 and means[500][CAP] == 3000
    assert not config_means([_row(0, 0, 0, 0.01, feasible=False)], CAP, J)[0]["feasible"]


def test_the_front_is_over_the_means_highest_capacity_first():
    configs = [{"params": {}, CAP: c, J: j, "feasible": f} for c, j, f in
               [(3000, 0.03, True), (2000, 0.01, True), (1500, 0.02, True), (4000, 0.001, False)]]
    assert [(c[CAP], c[J]) for c in front(configs, CAP, J)] == [(3000, 0.03), (2000, 0.01)]


def test_a_front_config_with_one_window_is_re_measured_but_never_two_windows_in_a_row():
    lucky = [_row(0, 0, 2000, 0.02), _row(1, 500, 3000, 0.02)]  # 500 µs's one window dominates the baseline
    assert next_replicate(lucky, CAP, J, 3, 2) == {"delay": 500}
    assert next_replicate([*lucky, _row(2, 500, 1000, 0.02, replicate=True)], CAP, J, 3, 2) is None
    # its mean fell to 2000 (a tie with the baseline's one window): the front's first with too few windows next
    again = [*lucky, _row(2, 500, 1000, 0.02, replicate=True), _row(3, 1000, 100, 0.05)]
    assert next_replicate(again, CAP, J, 3, 2) == {"delay": 0}
    full = [_row(i, 0, 2000, 0.02) for i in range(3)]
    assert next_replicate(full, CAP, J, 3, 2) is None  # measured enough: draw a new config
    assert next_replicate(lucky, CAP, J, 1, 2) is None  # replication off
    assert next_replicate(lucky, CAP, J, 3, 2, explore_first=3) is None  # the sampler's random start first
    assert replicates_of(LoadtestTuneSettings(sampler="random", replicates=3)) == 1
    assert replicates_of(LoadtestTuneSettings(sampler="tpe", replicates=3)) == 3


def test_a_tpe_study_re_measures_its_front_within_the_same_window_budget(tmp_path):
    tune = LoadtestTuneSettings(max_queue_delay_us=(0, 8000), delay_step_us=500, instances=(1, 1), seed=3,
                                sampler="tpe", startup_trials=2, preferred_batch_sizes=[[]], replicates=3)
    space = TuneSpace.from_settings(tune, ["m-fp32"])
    baseline = {"model": "m-fp32", "max_batch_size": 64, "preferred": "none", "max_queue_delay_us": 0,
                "instances": 1}
    space = space.with_baseline(baseline)
    noise = itertools.cycle([1.6, 0.7, 1.0, 0.8, 1.2])  # the same config's window varies from window to window
    window = FakeWindow()
    measure = window.measure

    def noisy(model, out_dir, users, seconds, shape="steady"):
        result = measure(model, out_dir, users, seconds, shape)
        factor = next(noise)
        for phase in result.get("phases", []):
            phase["rps"] *= factor
        return result

    window.measure = noisy
    lines = []
    study = open_study(tmp_path / "s.journal", "s", make_sampler(tune, space))
    assert run_study(study, Objective(Tracking(window), space, window, tmp_path, 10, lines.append), 10, baseline,
                     replicates_of(tune), 3, tune.startup_trials) == 10

    rows = trial_rows(study)
    again = [r for r in rows if r.get("replicate")]
    assert len(rows) == 10 and again  # the same budget, some of it spent re-measuring
    assert not any(r.get("replicate") for r in rows[:tune.startup_trials])
    assert all(not a.get("replicate") or not b.get("replicate") for a, b in zip(rows, rows[1:]))
    assert sum("(re-measured)" in line for line in lines) == len(again)
    means = config_means(rows, CAP, J)
    assert sum(c["windows"] for c in means) == 10 and max(c["windows"] for c in means) <= 3
    for row in again:  # every re-measured config was on the front of the windows before it
        before = front(config_means([r for r in rows if r["trial"] < row["trial"]], CAP, J), CAP, J)[:3]
        assert row["params"] in [c["params"] for c in before]

    # verification ranks the finalists by their means: one config measured thrice is one finalist
    steady = FakeWindow()
    _, attempts = verify(Tracking(steady), rows, steady, 5, 10, tmp_path, space=space)
    assert len(attempts) == len({str(c["params"]) for c in means if c["feasible"]})
