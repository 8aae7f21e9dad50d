"""The held-out benchmark's bookkeeping: a method's outcome at a share of its compute, and the goals' wins."""

from pathlib import Path

import pytest

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from bench._heldout import METHODS, Pair, method_settings, wins
from bench._tuning import Outcome
from bench.pool import POOL


def trial(cpu_s, value):
    return create_trial(state=TrialState.COMPLETE, values=[value, 1.0, 1.0], params={"x": 0.5},
                        distributions={"x": FloatDistribution(0, 1)},
                        user_attrs={"compute": {"cpu_s": cpu_s, "joules": 1.0, "energy_method": "estimated"}})


def outcome(method, runs, points):
    return Outcome(method, [trial(c, v) for c, v in runs], "maximize", Path("."), list(points), budget=40.0)


def pair():
    return Pair("breast-cancer", 0, "accuracy", "maximize", 10.0, [
        outcome("default", [(10.0, 0.90)], [(0.90, 2.0, 2.0)]),
        outcome("random search", [(8.0, 0.85), (12.0, 0.93)], [(0.85, 2.0, 2.0), (0.93, 2.0, 2.0)]),
        outcome("TPE + Hyperband", [(25.0, 0.95)], [(0.95, 2.0, 2.0)]),
        outcome("AutoGLM with priors", [(4.0, 0.92), (30.0, 0.94)], [(0.92, 1.0, 1.0), (0.94, 1.0, 1.0)])])


def test_a_method_at_a_multiple_of_the_budget_keeps_the_trials_and_points_that_ended_by_then():
    at_1b, at_2b = pair().at("random search", 1), pair().at("random search", 2)

    assert at_1b.best() == 0.85 and at_1b.points == [(0.85, 2.0, 2.0)]
    assert at_2b.best() == 0.93 and len(at_2b.points) == 2
    assert pair().reach("AutoGLM with priors") == 0.4 and pair().reach("TPE + Hyperband") == 2.5


def test_the_goals_count_strict_wins_and_a_method_with_nothing_completed_loses():
    at_1b, at_4b = wins(pair(), 1), wins(pair(), 4)

    assert at_1b == {"random search": (True, True), "TPE + Hyperband": (True, True)}  # Hyperband: nothing yet
    assert at_4b["random search"] == (True, True) and at_4b["TPE + Hyperband"][0] is False


def test_the_methods_differ_only_where_the_comparison_says(tmp_path):
    settings = {m: method_settings(POOL["diabetes"], 0, tmp_path, m).tune for m in ("default", *METHODS)
                if m != "AutoGLM with priors" or "portfolio" in type(method_settings(
                    POOL["diabetes"], 0, tmp_path, "default").tune).model_fields}

    assert not settings["default"].early_stop.enabled and settings["default"].search_space == "training"
    assert settings["TPE + Hyperband"].objectives == ["metric"] and settings["TPE + Hyperband"].early_stop.enabled
    assert settings["random search"].sampler == "random" and not settings["TPE"].early_stop.enabled
    assert settings["AutoGLM cold"].search_space == "default" and settings["AutoGLM cold"].warm_start is None
    assert all(s.space == POOL["diabetes"].space for m, s in settings.items() if m != "default")


def test_the_portfolio_greedily_covers_the_tasks_with_the_lowest_mean_regret():
    from bench._portfolio import greedy, regrets

    values = {"a": [0.90, 0.95, 0.80, float("nan")], "b": [2.0, 1.5, 1.0, 1.2]}  # a maximizes, b minimizes
    regret = regrets(values, {"a": "maximize", "b": "minimize"})

    assert regret["a"] == [pytest.approx(1 / 3), 0.0, 1.0, 1.0] and regret["b"] == pytest.approx([1.0, 0.5, 0.0, 0.2])
    assert greedy(regret, 2) == [1, 2]  # the best on average first, then the one covering what it misses
