"""``loadtest.tune.late_random``: the Bayesian sampler proposes the study's first half, then a share of the
trials are random draws, evenly spaced."""

import optuna
import pytest

from autoglm.config import LoadtestTuneSettings
from loadtest.late_draws import is_late_draw, late_draws

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_late_draws_fall_evenly_in_the_second_half_only():
    assert [n for n in range(17) if is_late_draw(n, 17, 0.5)] == [9, 11, 13, 15]
    assert [n for n in range(20) if is_late_draw(n, 20, 1 / 3)] == [12, 15, 18]
    assert not any(is_late_draw(n, 20, 0.0) for n in range(40))
    assert sum(is_late_draw(n, 100, 0.25) for n in range(100)) == 12  # a quarter of the 50 after the half, floored


def _study(sampler, n: int) -> list[dict]:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1) + t.suggest_int("k", 1, 8),
                              t.suggest_float("x", 0, 1) * t.suggest_int("k", 1, 8)), n_trials=n)
    return [t.params for t in study.trials]


def test_the_first_half_is_the_models_own_and_the_late_draws_are_random(monkeypatch):
    def tpe():
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=3, multivariate=True)

    plain, sampler = _study(tpe(), 12), late_draws(tpe(), seed=3, n_trials=12, share=0.5)
    drawn = []
    original = sampler.random.sample_independent
    monkeypatch.setattr(sampler.random, "sample_independent",
                        lambda study, trial, *a: drawn.append(trial.number) or original(study, trial, *a))
    late = _study(sampler, 12)
    assert late[:6] == plain[:6]  # the same model's proposals while the first half runs
    assert sorted(set(drawn)) == [n for n in range(12) if is_late_draw(n, 12, 0.5)] == [7, 9, 11]
    assert late[7] != plain[7]


def test_only_the_bayesian_samplers_take_late_draws_and_the_share_is_checked():
    from loadtest.study import make_sampler

    tune, space = LoadtestTuneSettings(sampler="tpe", late_random=0.5, seed=0), None  # only the grid reads a space
    assert type(make_sampler(tune, space, 17)).__name__ == "LateDraws"
    assert isinstance(make_sampler(tune.model_copy(update={"late_random": 0.0}), space),
                      optuna.samplers.TPESampler)
    assert isinstance(make_sampler(tune.model_copy(update={"sampler": "random"}), space), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="late_random"):
        LoadtestTuneSettings(late_random=1.0)
