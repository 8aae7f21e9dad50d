"""The samplers: TPE's random start-up counts only the trials it drew, not those the tuner placed; a share of the
trials proposed for the metric alone."""

import math

import optuna
import pytest

from autoglm.errors import ConfigError
from tune.sampler import DrawnStartup, MetricShare, drawn_trials, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    return x, 1.0 - x


def _study(sampler):
    return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)


@pytest.mark.parametrize(("startup", "expected"), [(None, 6), (3, 3)])
def test_tpe_models_after_its_startup_trials(startup, expected):
    sampler = make_sampler("tpe", 0, 3, startup)
    assert isinstance(sampler, DrawnStartup) and sampler.startup == expected
    assert sampler.model._n_startup_trials == expected


def test_an_unknown_sampler_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="tpe, nsga2, random or gp"):
        make_sampler("cmaes", 0, 3)


def test_placed_trials_do_not_count_toward_the_random_startup():
    """A warm start and two siblings, all at x = 0.5: the next 3 trials are drawn at random, exactly the
    points a RandomSampler of the same seed draws, though TPE alone would model from the 4th trial on."""
    study = _study(make_sampler("tpe", 7, 2, startup_trials=3))
    study.enqueue_trial({"x": 0.5}, user_attrs={"warm_start": True})
    for _ in range(2):
        study.enqueue_trial({"x": 0.5}, user_attrs={"sibling_of": 0}, skip_if_exists=False)
    study.optimize(_objective, n_trials=3)
    assert drawn_trials(study) == 0
    assert study.sampler.exploring(study)

    study.optimize(_objective, n_trials=3)
    reference = _study(optuna.samplers.RandomSampler(seed=7))
    reference.optimize(_objective, n_trials=3)
    assert [t.params["x"] for t in study.trials[3:]] == [t.params["x"] for t in reference.trials]
    assert drawn_trials(study) == 3 and not study.sampler.exploring(study)


def test_after_the_startup_the_model_samples(monkeypatch):
    sampler = make_sampler("tpe", 0, 2, startup_trials=2)
    study = _study(sampler)
    study.optimize(_objective, n_trials=2)
    modelled = []
    sample = sampler.model.sample_relative
    monkeypatch.setattr(sampler.model, "sample_relative",
                        lambda *a: modelled.append(1) or sample(*a))
    study.optimize(_objective, n_trials=1)
    assert modelled, "TPE was not consulted once the start-up was over"


def test_a_stopped_drawn_trial_counts_a_failed_one_does_not():
    study = _study(make_sampler("tpe", 0, 2, startup_trials=5))

    def stopped(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise optuna.TrialPruned()

    def failing(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise RuntimeError("boom")

    study.optimize(stopped, n_trials=2)
    study.optimize(failing, n_trials=1, catch=(RuntimeError,))
    assert drawn_trials(study) == 2


@pytest.mark.parametrize("name", ["tpe", "random", "gp"])
def test_after_the_startup_numeric_knobs_are_drawn_within_the_narrowed_ranges(name):
    from tune.sampler import Narrowing

    sampler = Narrowing(make_sampler(name, 0, 2, startup_trials=4), startup=4)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    inside = []

    def objective(trial):
        narrowed = sampler.ranges(study)  # what the sampler narrowed to as this trial began
        x = trial.suggest_float("x", 0.0, 100.0)
        lr = trial.suggest_float("lr", 1e-5, 1.0, log=True)
        width = trial.suggest_int("width", 8, 256, step=8)
        kind = trial.suggest_categorical("kind", ["a", "b"])
        if narrowed:
            inside.append(all(narrowed[k][0] <= v <= narrowed[k][1] for k, v in (("x", x), ("lr", lr),
                                                                                 ("width", width))))
        return (x - 20) ** 2 + (width - 64) ** 2 + (kind == "b"), abs(math.log10(lr) + 3)

    study.optimize(objective, n_trials=14)

    assert len(inside) == 10 and all(inside)  # every trial after the four start-up ones
    ranges = sampler.ranges(study)
    assert ranges["x"][1] - ranges["x"][0] < 100.0 and (ranges["width"][0] - 8) % 8 == 0
    assert set(ranges) == {"x", "lr", "width"}  # a categorical knob keeps its choices


def test_the_adaptive_preset_and_its_article_alias_narrow_the_configured_sampler(tmp_path):
    from autoglm.tasks import get_task
    from tests.tune import _tiny
    from tune.sampler import Narrowing
    from tune.space import build_space, is_adaptive
    from tune.storage import study_sampler

    settings = _tiny.settings(tmp_path, "tune.search_space='adaptive-v2'", "tune.startup_trials=3")
    sampler = study_sampler(settings, 0, 3)
    task = get_task(settings)

    assert is_adaptive("adaptive") and is_adaptive("adaptive-v2") and not is_adaptive("default")
    assert isinstance(sampler, Narrowing) and sampler.startup == 3 and isinstance(sampler.sampler, DrawnStartup)
    shared = study_sampler(_tiny.settings(tmp_path, "tune.search_space='adaptive'", "tune.metric_share=0.5"), 0, 3)
    assert isinstance(shared.sampler, MetricShare)  # the metric's share is drawn inside the narrowed ranges
    assert build_space(task, "adaptive-v2") == build_space(task, "adaptive") == build_space(task, "default")
    assert not isinstance(study_sampler(_tiny.settings(tmp_path), 0, 3), Narrowing)


def _served(trial):
    """Metric (minimized) best at x = 0.9 and uncompressed; cost lower for small x and when quantized."""
    x = trial.suggest_float("x", 0.0, 1.0)
    mode = trial.suggest_categorical("quantize.mode", ["none", "dynamic"])
    return (x - 0.9) ** 2 + (0.05 if mode == "dynamic" else 0.0), x + (0.0 if mode == "dynamic" else 0.5)


def test_metric_share_proposes_its_turns_for_the_metric_alone_uncompressed():
    sampler = MetricShare(make_sampler("tpe", 3, 2, startup_trials=3), 0.5, 3, seed=3,
                          off={"quantize.mode": "none"})
    study = _study(sampler)
    study.enqueue_trial({"x": 0.1, "quantize.mode": "dynamic"}, user_attrs={"portfolio": 0})
    focused = []
    study.optimize(lambda t: focused.append(t.number in sampler._mirrors) or _served(t), n_trials=23)

    # the queued trial stands for a start-up draw (as DrawnStartup counts it); from the 4th on every other is focused
    assert [n for n, f in enumerate(focused) if f] == list(range(3, 23, 2))
    on_metric = [t for t in study.trials if focused[t.number]]
    spread = [t for t in study.trials[3:] if not focused[t.number]]
    assert all(t.params["quantize.mode"] == "none" and t.user_attrs["proposed_for"] == "metric" for t in on_metric)
    assert not any("proposed_for" in t.user_attrs for t in spread)  # the rungs judge these on every objective
    assert study.trials[0].params == {"x": 0.1, "quantize.mode": "dynamic"}  # a queued point is never re-proposed
    # the metric-only proposals sit nearer the metric's optimum than the multi-objective model's spread ones
    gap = lambda trials: sorted(abs(t.params["x"] - 0.9) for t in trials)[len(trials) // 2]  # noqa: E731
    assert gap(on_metric) < gap(spread) and gap(on_metric) < 0.15


def test_metric_share_wraps_tpe_and_gp_on_several_objectives_only(tmp_path):
    from tests.tune import _tiny
    from tune.storage import study_sampler

    on = "tune.metric_share=0.5"
    shared = study_sampler(_tiny.settings(tmp_path, on), 0, 3)
    assert isinstance(shared, MetricShare) and shared.share == 0.5 and shared.off["quantize.mode"] == "none"
    assert shared.metric_index == 0 and shared.off["prune.ratio"] == 0.0
    for sets, n in (((), 3), ((on, "tune.sampler='random'"), 3), ((on, "tune.sampler='nsga2'"), 3),
                    ((on, "tune.objectives=['metric']"), 1)):  # off by default; on for TPE/GP and several objectives
        assert not isinstance(study_sampler(_tiny.settings(tmp_path, *sets), 0, n), MetricShare)
    own = optuna.samplers.RandomSampler(seed=0)
    assert study_sampler(_tiny.settings(tmp_path, on), 0, 3, own) is own  # a user's sampler object is left alone
    latency_first = study_sampler(_tiny.settings(tmp_path, on, "tune.objectives=['latency','metric']"), 0, 2)
    assert latency_first.metric_index == 1
