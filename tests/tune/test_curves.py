"""Learning-curve extrapolation against synthetic curves with known asymptotes, and the stopping rule built on it."""

import math

import numpy as np
import optuna
import pytest

from autoglm.config import load_settings
from tune import attributes as attrs
from tune.curves import calibration, fit_power_law, forecast
from tune.early_stop import ParetoHalving, RungCallback, auto_min_resource
from tune.objective import with_first_rung
from tune.space import build_space

STEPS = np.arange(50, 2001, 50.0)
LOSS = ("minimize", "minimize")  # validation loss and latency


def power(a: float, b: float, c: float, steps=STEPS) -> np.ndarray:
    return a + b * steps ** -c


@pytest.mark.parametrize(("a", "b", "c"), [(1.5, 2.0, 0.5), (1.5, 20.0, 1.0), (0.2, 1.0, 0.3), (2.0, 5.0, 0.8)])
def test_the_fit_recovers_the_asymptote_of_a_power_law(a, b, c):
    noisy = power(a, b, c) + np.random.default_rng(0).normal(0, 0.005, len(STEPS))

    exact, fitted = fit_power_law(STEPS, power(a, b, c)), fit_power_law(STEPS, noisy)

    assert exact.a == pytest.approx(a, abs=0.02) and exact.c == pytest.approx(c, rel=0.1)
    assert fitted.a == pytest.approx(a, abs=0.08)


def test_the_forecast_from_the_first_fifth_brackets_the_true_end_of_a_noisy_curve():
    truth = power(1.5, 2.0, 0.5)
    hits = 0
    for seed in range(20):
        noisy = truth + np.random.default_rng(seed).normal(0, 0.01, len(STEPS))
        ahead = forecast(STEPS[:8], noisy[:8], 2000, seed=seed)
        hits += ahead.low <= truth[-1] <= ahead.high
        assert ahead.low <= ahead.predicted <= ahead.high
    assert hits >= 14  # an 80% band: most seeds hold the truth


def test_too_few_points_make_no_forecast():
    assert fit_power_law([100, 200, 300], [2.0, 1.8, 1.7]) is None
    assert forecast([100, 200, 300, 400], [2.0, float("nan"), 1.7, 1.6], 1000) is None  # a NaN is no point


def test_a_curve_that_gets_worse_is_forecast_flat_not_worse():
    ahead = forecast(STEPS[:6], np.linspace(1.0, 1.5, 6), 2000)

    assert ahead.fit.b == 0.0 and ahead.predicted == pytest.approx(1.25)


def test_calibration_learns_that_annealed_curves_end_below_their_power_law():
    plain = [(list(zip(STEPS, power(1.5, 2.0, 0.5), strict=True)), power(1.5, 2.0, 0.5)[-1])]
    # a schedule that anneals: the last third drops a further 0.2 below the power law
    bent = power(1.5, 2.0, 0.5) - 0.2 * np.clip((STEPS - 1333) / 667, 0, 1)
    annealed = [(list(zip(STEPS, bent, strict=True)), bent[-1])]

    assert calibration(plain, 0.3) == pytest.approx(0.0, abs=0.01)
    assert calibration(annealed, 0.3) == pytest.approx(-0.2, abs=0.03)
    assert calibration([], 0.3) == 0.0


def _study_with_a_finished_trial(loss: float, latency: float, curve=None):
    study = optuna.create_study(directions=list(LOSS))
    curve = curve if curve is not None else power(loss - 0.1, 2.0, 0.5)
    study.add_trial(optuna.trial.create_trial(values=[loss, latency], user_attrs={
        "history": [[int(s), float(v)] for s, v in zip(STEPS, curve, strict=True)], "train_metric": float(curve[-1])}))
    return study


def _history(curve, n: int) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in zip(STEPS[:n], curve[:n], strict=True)]


def test_a_clearly_losing_curve_is_stopped_and_a_winning_one_kept():
    study = _study_with_a_finished_trial(loss=1.6, latency=1.0)
    rule = ParetoHalving(LOSS, min_resource=100, warmup_trials=1, extrapolate=True)
    losing, winning = study.ask(), study.ask()

    stopped = rule.forecast_dominated(study, losing, _history(power(2.5, 2.0, 0.5), 8), [2.0], 2000)
    kept = rule.forecast_dominated(study, winning, _history(power(1.2, 2.0, 0.5), 8), [2.0], 2000)

    assert stopped is not None and stopped.predicted == pytest.approx(2.545, abs=0.05)
    assert attrs.FORECAST.get(study.trials[1])["optimistic"] > 1.6  # recorded on the trial it stopped
    assert kept is None


def test_a_non_dominated_trial_is_never_stopped_however_bad_its_curve():
    study = _study_with_a_finished_trial(loss=1.6, latency=1.0)
    rule = ParetoHalving(LOSS, min_resource=100, warmup_trials=1, extrapolate=True)

    faster = rule.forecast_dominated(study, study.ask(), _history(power(2.5, 2.0, 0.5), 8), [0.5], 2000)

    assert faster is None  # the worst loss, but the lowest latency: on the front


def test_no_decision_without_enough_points_a_completed_trial_or_the_option():
    study = _study_with_a_finished_trial(loss=1.6, latency=1.0)
    losing = _history(power(2.5, 2.0, 0.5), 8)
    on = ParetoHalving(LOSS, min_resource=100, warmup_trials=1, extrapolate=True)

    assert on.forecast_dominated(study, study.ask(), losing[:3], [2.0], 2000) is None
    assert ParetoHalving(LOSS, extrapolate=False).forecast_dominated(study, study.ask(), losing, [2.0], 2000) is None
    empty = optuna.create_study(directions=list(LOSS))
    assert on.forecast_dominated(empty, empty.ask(), losing, [2.0], 2000) is None


def test_the_compression_shift_counts_and_accuracy_is_maximized():
    study = optuna.create_study(directions=["maximize", "minimize"])
    acc = 0.95 - 0.5 * STEPS ** -0.5
    study.add_trial(optuna.trial.create_trial(values=[0.93, 1.0], user_attrs={
        "history": [[int(s), float(v)] for s, v in zip(STEPS, acc, strict=True)], "train_metric": float(acc[-1])}))
    rule = ParetoHalving(("maximize", "minimize"), min_resource=100, warmup_trials=1, extrapolate=True)
    close = _history(0.95 - 0.5 * STEPS ** -0.5, 8)  # heading for 0.939: better than the completed 0.93

    assert rule.forecast_dominated(study, study.ask(), close, [1.0], 2000) is None
    # served 5 points lower (its compression's observed loss): 0.889, dominated
    assert rule.forecast_dominated(study, study.ask(), close, [1.0], 2000, shift=-0.05) is not None


def test_the_rung_callback_stops_a_losing_trial_between_rungs():
    study = _study_with_a_finished_trial(loss=1.6, latency=1.0)
    rule = ParetoHalving(LOSS, reduction_factor=3, min_resource=100, warmup_trials=5, extrapolate=True)
    hook = RungCallback(rule, study, study.ask(), ["metric", "latency"], {"latency": 2.0}, 2000)

    for step, value in zip(STEPS, power(2.5, 2.0, 0.5), strict=True):
        if hook(int(step), float(value)):
            break

    # its fourth evaluation (enough points to fit), between the rungs at 100 and 300, which stop nothing here
    # (a rung needs 5 trials): the forecast stopped it
    assert hook.stopped_at == 200 and rule.rungs(2000) == [100, 300, 900]


@pytest.mark.parametrize(("max_steps", "trials", "warmup", "expected"), [
    (1200, 4, 0, 1200 // 27 + 1),  # three rungs: 45, 134, 400
    (1200, 2, 0, 400),  # a budget of two schedules fills one rung
    (1200, 1, 0, 400),  # at least one rung
    (1200, 500, 0, 15),  # a deep budget: Hyperband's deepest bracket, 1200 / 81...
    (1200, 500, 60, 134),  # ...but none inside the warm-up (60 steps)
])
def test_the_first_rung_follows_the_budget(max_steps, trials, warmup, expected):
    first = auto_min_resource(max_steps, trials, 3, warmup)

    assert first == expected
    assert first > warmup


def test_auto_min_resource_is_resolved_from_the_space_s_longest_schedule():
    from autoglm.tasks.digits import DigitsTask

    settings = load_settings(None, ["tune.early_stop.min_resource='auto'", "tune.early_stop.budget_trials=3",
                                    "train.warmup_frac=0.0"])
    space = build_space(DigitsTask(), "training", {"train.max_steps": {"high": 900}})

    resolved = with_first_rung(settings, space)

    assert resolved.tune.early_stop.min_resource == 100  # 900 / 3^2
    assert with_first_rung(resolved, space) is resolved  # a number stays as it is
    assert math.isclose(settings.tune.early_stop.budget_trials, 3)


def test_first_rung_frac_raises_the_first_rung_to_its_share_of_the_longest_schedule():
    from autoglm.tasks.digits import DigitsTask

    space = build_space(DigitsTask(), "training", {"train.max_steps": {"high": 900}})
    late = load_settings(None, ["tune.early_stop.min_resource=50", "tune.early_stop.first_rung_frac=0.2"])
    early = load_settings(None, ["tune.early_stop.min_resource=300", "tune.early_stop.first_rung_frac=0.2"])
    auto = load_settings(None, ["tune.early_stop.min_resource='auto'", "tune.early_stop.budget_trials=3",
                                "train.warmup_frac=0.0", "tune.early_stop.first_rung_frac=0.25"])

    assert with_first_rung(late, space).tune.early_stop.min_resource == 180  # 0.2 x 900
    assert with_first_rung(early, space) is early  # already later than that share: unchanged
    assert with_first_rung(auto, space).tune.early_stop.min_resource == 225  # the budget's 100, raised to 900 / 4
    with pytest.raises(ValueError, match="first_rung_frac"):
        load_settings(None, ["tune.early_stop.first_rung_frac=1.5"])


def test_a_tiny_study_runs_with_extrapolation_and_rungs_from_the_budget(tmp_path):
    from tests.tune import _tiny
    from tune.stage import run_study

    settings = _tiny.settings(tmp_path, "tune.n_trials=2", "tune.early_stop.min_resource='auto'",
                              "tune.early_stop.budget_trials=3", "tune.early_stop.extrapolate=true",
                              "tune.early_stop.warmup_trials=1", "tune.compression_siblings=false")

    _, study = run_study(settings, tmp_path / "tune", progress=False)

    assert [t.state.name for t in study.trials].count("FAIL") == 0 and len(study.trials) == 2
    # 120 steps, a budget of 3 schedules: rungs at ceil(120 / 3^2) = 14 steps and 42
    assert all(t.user_attrs.get("schedule_steps") == 120 for t in study.trials if "rung_14" in t.user_attrs)
    assert any("rung_14" in t.user_attrs for t in study.trials)
