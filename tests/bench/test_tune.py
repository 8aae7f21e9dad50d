"""The tuning benchmark's bookkeeping: compute to reach a target, and hypervolumes on one shared scale."""

from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from bench._tuning import Outcome, hypervolumes

DIRS = ["maximize", "minimize", "minimize"]


def trial(state, steps, cpu_s, values=None, **attrs):
    return create_trial(state=state, values=values, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                        user_attrs={"steps": steps, "compute": {"cpu_s": cpu_s, "joules": 10 * cpu_s,
                                                                "energy_method": "estimated"}, **attrs})


def outcome(method, trials, points=()):
    return Outcome(method, trials, "maximize", Path("."), list(points))


def test_compute_to_reach_counts_every_trial_up_to_the_first_good_enough_one():
    trials = [trial(TrialState.PRUNED, 50, 1.0), trial(TrialState.COMPLETE, 200, 4.0, [0.90, 1.0, 1.0]),
              trial(TrialState.COMPLETE, 300, 5.0, [0.99, 1.0, 1.0], cache_hit=True),
              trial(TrialState.COMPLETE, 300, 5.0, [0.995, 1.0, 1.0])]

    reached, missed = outcome("AutoGLM", trials).reach(0.95), outcome("AutoGLM", trials).reach(0.999)

    assert reached == (250, pytest.approx(10.0))  # the cached trial trained nothing
    assert missed is None


def test_a_trial_that_ends_past_the_budget_is_charged_but_not_counted():
    trials = [trial(TrialState.COMPLETE, 200, 4.0, [0.90, 1.0, 1.0]), trial(TrialState.COMPLETE, 300, 5.0,
                                                                          [0.99, 1.0, 1.0])]
    searched = Outcome("random search", trials, "maximize", Path("."), budget=8.0)  # the second ends at 9 CPU-s

    assert searched.best() == 0.90 and searched.reach(0.95) is None and len(searched.trials) == 2


def test_the_found_configuration_alone_is_charged_its_own_trial_or_the_one_that_trained_its_model():
    trials = [trial(TrialState.COMPLETE, 200, 4.0, [0.90, 1.0, 1.0], training_key="a"),
              trial(TrialState.COMPLETE, 300, 7.0, [0.97, 1.0, 1.0], training_key="b"),
              trial(TrialState.COMPLETE, 300, 1.0, [0.99, 1.0, 1.0], training_key="b", cache_hit=True)]
    searched = outcome("AutoGLM", trials)

    assert searched.own_cpu(0.95) == pytest.approx(7.0)
    assert searched.own_cpu(0.98) == pytest.approx(7.0)  # a sibling reuses trial 1's model: trial 1 trained it
    assert searched.own_cpu(0.999) is None and searched.reach(0.98) == (500, pytest.approx(12.0))


def test_the_default_reaches_its_final_metric_at_its_first_evaluation_that_good():
    run = trial(TrialState.COMPLETE, 600, 20.0, [0.99, 1.0, 1.0], history=[[200, 0.97], [400, 0.99], [600, 0.99]])

    assert outcome("default", [run]).reach(0.99) == (400, pytest.approx(20.0))


def test_hypervolumes_share_one_scale_and_rank_a_dominating_front_first():
    better = outcome("AutoGLM", [], [(0.99, 1.0, 1e-4), (0.95, 0.2, 2e-5)])
    worse = outcome("random search", [], [(0.97, 1.5, 2e-4)])
    empty = outcome("TPE, no early stopping", [])

    volumes = hypervolumes([better, worse, empty], DIRS)

    assert 1.0 >= volumes["AutoGLM"] > volumes["random search"] > 0.0
    assert volumes["TPE, no early stopping"] == 0.0


def test_only_autoglm_is_warm_started_and_searches_compression_and_the_searches_share_one_space(tmp_path):
    from bench.tune import METHODS, SETUPS, _settings

    setup = SETUPS["digits"]
    settings = {m: _settings(setup, 0, tmp_path, m).tune for m in ["default", *METHODS]}

    assert settings["AutoGLM"].warm_start and settings["AutoGLM"].space == setup.space | setup.compression_space
    for method in ("default", "random search", "TPE, no early stopping", "AutoGLM, cold start"):
        assert settings[method].warm_start is None
    assert all(s.portfolio is None for s in settings.values())  # no method here starts from the shipped priors
    cold = settings["AutoGLM, cold start"].model_dump(exclude={"warm_start"})
    assert cold == settings["AutoGLM"].model_dump(exclude={"warm_start"})  # the ablation changes nothing else
    assert settings["random search"].space == settings["TPE, no early stopping"].space == setup.space
    assert settings["TPE, no early stopping"].startup_trials == settings["AutoGLM"].startup_trials


def test_attainability_trains_the_default_and_each_probe_alone_and_says_which_reach_it(tmp_path):
    from dataclasses import replace

    from bench.tune import SETUPS, attainability

    setup = replace(SETUPS["digits"], default_steps=60, probes=({"train.lr": 1e-9, "train.max_steps": 20},),
                    probe_seeds=(0, 1))
    table = attainability(setup, tmp_path)

    assert [row[0] for row in table.rows] == [0, 0, 1, 1, "mean", "mean"] and "(seeds 0, 1)" in table.title
    for default, frozen in (table.rows[:2], table.rows[2:4]):
        assert default[1] == "the default" and default[5] is True and default[4] == "100%"
        assert frozen[1] == "train.lr=1e-09, train.max_steps=20"
        assert frozen[2] < default[2] and frozen[5] is False  # a model that cannot learn never reaches it
        assert frozen[6].startswith("20:")  # its validation history, step:value
    default_mean, frozen_mean = table.rows[4:]
    assert default_mean[1] == "the default" and default_mean[5] == "2 of 2 seeds" and default_mean[4] == "100%"
    assert frozen_mean[1] == "train.lr=1e-09, train.max_steps=20" and frozen_mean[5] == "0 of 2 seeds"
    assert frozen_mean[2] == pytest.approx((table.rows[1][2] + table.rows[3][2]) / 2)



def test_compare_runs_every_method_on_the_default_s_budget_and_judges_the_goals(tmp_path, monkeypatch):
    from dataclasses import replace

    import bench.tune
    from bench._tuning import cpu_spent
    from bench.tune import METHODS, SETUPS, compare

    seen = []  # run_seed's outcomes, as compare gets them
    real_run_seed = bench.tune.run_seed
    monkeypatch.setattr(bench.tune, "run_seed", lambda *a, **k: seen.append(real_run_seed(*a, **k)) or seen[-1])
    digits = SETUPS["digits"]
    setup = replace(digits, default_steps=60, space={**digits.space, "train.max_steps": {"low": 20, "high": 40}},
                    overrides=(*digits.overrides, "tune.early_stop.min_resource=10"))
    table = compare(setup, (0,), tmp_path, max_trials=8)  # a bound: without the budget rule, a failure, not a hang

    (_, budget, outcomes), = seen
    default, *searches = outcomes
    assert budget == cpu_spent(default.trials) > 0  # the default's own CPU-seconds are every method's budget B
    assert [o.method for o in searches] == list(METHODS)
    for o in searches:  # a trial starts only while its method has spent less than B; what ends past B is not counted
        ran = [t for t in o.trials if t.state.is_finished()]  # siblings still queued when the budget ran out did not
        assert o.budget == budget and cpu_spent(o.counted) <= budget and cpu_spent(ran[:-1]) < budget
        assert len(o.points) == len(o.complete)  # every counted, completed trial was re-timed for the hypervolume
    seed_rows = [r for r in table.rows if r[0] != "mean"]
    assert seed_rows[0][0] == f"0 (B = {budget:.1f} CPU-s)" and [r[1] for r in seed_rows] == ["default", *METHODS]
    for row, o in zip(seed_rows, outcomes, strict=True):
        assert row[7] == pytest.approx(cpu_spent(o.trials)) and 0.0 <= row[9] <= 1.0
    assert [r[1] for r in table.rows if r[0] == "mean"] == ["default", *METHODS]
    goals = [n for n in table.notes if n.startswith("goal:")]
    assert len(goals) == 2 and all(g.endswith(("**met**", "**NOT met**")) for g in goals)
