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


def test_the_goals_table_counts_the_wins_per_domain():
    from dataclasses import replace

    from bench._heldout_report import goals_table

    cold = outcome("AutoGLM cold", [(5.0, 0.91)], [(0.91, 1.0, 1.0)])
    tabular = replace(pair(), outcomes=[*pair().outcomes, cold])
    text = replace(tabular, task="prose")

    notes = " ".join(goals_table([tabular, text, replace(tabular, seed=1)]).notes)

    # priors 0.92 at 1B, 0.92 at 2B, 0.94 at 4B vs random 0.85/0.93/0.93 and TPE + Hyperband —/—/0.95
    assert "text (1 pairs): 1B 1/1, 2B 0/1, 4B 1/0; non-text (2 pairs): 1B 2/2, 2B 0/2, 4B 2/0" in notes


def test_the_methods_differ_only_where_the_comparison_says(tmp_path):
    settings = {m: method_settings(POOL["diabetes"], 0, tmp_path, m).tune for m in ("default", *METHODS)
                if m != "AutoGLM with priors" or "portfolio" in type(method_settings(
                    POOL["diabetes"], 0, tmp_path, "default").tune).model_fields}

    assert not settings["default"].early_stop.enabled and settings["default"].search_space == "training"
    assert settings["TPE + Hyperband"].objectives == ["metric"] and settings["TPE + Hyperband"].early_stop.enabled
    assert settings["random search"].sampler == "random" and not settings["TPE"].early_stop.enabled
    assert settings["AutoGLM cold"].search_space == "default" and settings["AutoGLM cold"].warm_start is None
    # Hyperband's resource is the step on one schedule; AutoGLM searches the schedule's length as random search does
    assert settings["TPE + Hyperband"].early_stop.shared_schedule
    assert not any(s.early_stop.shared_schedule for m, s in settings.items() if m.startswith("AutoGLM"))
    assert all(s.space == POOL["diabetes"].space for m, s in settings.items() if m != "default")


def test_regret_is_zero_for_the_best_one_for_the_median_and_capped_for_failures():
    from bench._portfolio import WORST, regrets

    values = {"a": [0.90, 0.95, 0.80, float("nan")], "b": [2.0, 1.5, 1.0, 9.0]}  # a maximizes, b minimizes
    regret = regrets(values, {"a": "maximize", "b": "minimize"})

    assert regret["a"] == [pytest.approx(1.0), 0.0, WORST, WORST]  # median 0.90; 0.80 is 3 medians off, capped
    assert regret["b"] == pytest.approx([4 / 3, 2 / 3, 0.0, WORST])  # median 1.75


def test_the_portfolio_orders_entries_by_what_finishes_within_each_budget():
    from bench._portfolio import MISSING, anytime_regret, greedy

    regret = {"a": [0.0, 0.5, 1.0], "b": [0.0, 0.6, 1.0]}
    cost = {"a": [1.5, 0.5, 0.4], "b": [1.5, 0.6, 0.5]}  # entry 0 is the best but does not fit inside 1B

    assert anytime_regret([0], regret, cost, (1,)) == MISSING
    assert anytime_regret([1, 0], regret, cost, (1, 2, 4)) == pytest.approx((0.5 + 0.0 + 0.0 + 0.6 + 0.6 + 0.0) / 6)
    order = greedy(regret, cost, 2)
    assert order == [1, 0]  # the cheap good entry first (it fits inside 1B), then the best one, done by 2B
    assert greedy(regret, cost, 3) == [1, 0]  # entry 2 would lower the regret no further: left out
    assert greedy(regret, {"a": [1.5, 1.2, 1.1], "b": [1.5, 1.2, 1.1]}, 1) == [2]  # none fits: the cheapest


def test_sobol_candidates_cover_each_dimension_within_its_range():
    from bench._portfolio import DIMENSIONS, sobol_candidates
    from tune.portfolio import PortfolioEntry

    drawn = sobol_candidates(16)
    for name, (low, high, _) in DIMENSIONS.items():
        got = [c["knobs"][name] if "." in name else c[name] for c in drawn]
        assert low <= min(got) < low + (high - low) / 4 and high - (high - low) / 4 < max(got) <= high
    assert all(PortfolioEntry.from_dict(c) for c in drawn)  # every candidate is a valid entry


def test_a_candidate_trains_on_its_own_schedule_and_the_configured_run_on_the_whole_one(tmp_path):
    from bench._portfolio import candidate_settings

    short = candidate_settings({"steps_frac": 0.1, "lr_mult": 2.0}, POOL["noisy-linear"], tmp_path).tune
    whole = candidate_settings({}, POOL["noisy-linear"], tmp_path).tune
    lm = candidate_settings({"steps_frac": 0.1}, POOL["json"], tmp_path).tune

    assert short.space["train.max_steps"] == 300 and whole.space["train.max_steps"] == 3000  # of 3000 configured
    assert lm.space["train.max_steps"] == 100  # 40 steps clipped into the searched 100-400
    assert short.space["train.lr"] == pytest.approx(2 * whole.space["train.lr"])
    assert not short.early_stop.enabled


def test_the_previous_portfolio_competes_again_only_when_learned_on_development_tasks():
    from bench._portfolio import previous_entries
    from tune.portfolio import Portfolio, PortfolioEntry

    entries = (PortfolioEntry(lr_mult=2.0, source="json: AutoGLM-cold study trial 3"),
               PortfolioEntry(source="the task's configured run"))

    again = previous_entries(Portfolio(entries, {"learned_from": ["json"], "method": "m"}))
    assert again == [{"lr_mult": 2.0, "source": "shipped before: json: AutoGLM-cold study trial 3"}]
    assert previous_entries(Portfolio((PortfolioEntry.from_dict(again[0]),), {"learned_from": ["json"],
                                                                              "method": "m"})) == again
    assert previous_entries(Portfolio(entries, {"learned_from": ["json", "prose"], "method": "m"})) == []


def knobbed_pair(with_knobs):
    """A pair of PRIORS and its train-knobs twin: ``with_knobs`` = [(cpu_s, value, point)] of the twin."""
    from bench._heldout import ABLATIONS

    method = ABLATIONS["train-knobs"][0]
    return Pair("friedman1", 0, "rmse", "minimize", 10.0, [
        Outcome("default", [trial(10.0, 1.0)], "minimize", Path("."), [(1.0, 2.0, 2.0)]),
        Outcome("AutoGLM with priors", [trial(12.0, 0.8), trial(30.0, 0.7)], "minimize", Path("."),
                [(0.8, 2.0, 2.0), (0.7, 2.0, 2.0)], budget=40.0),
        Outcome(method, [trial(c, v) for c, v, _ in with_knobs], "minimize", Path("."),
                [p for _, _, p in with_knobs], budget=40.0)])


def test_the_train_knobs_ablation_adds_only_the_loop_knobs_to_the_priors_method(tmp_path):
    from bench._heldout import ABLATIONS, LOOP_KNOBS, SPECS

    method = ABLATIONS["train-knobs"][0]
    plain, knobbed = (method_settings(POOL["friedman1"], 0, tmp_path, m).tune for m in ("AutoGLM with priors", method))

    assert knobbed.space == plain.space | LOOP_KNOBS and set(LOOP_KNOBS) - set(plain.space) == set(LOOP_KNOBS)
    assert knobbed.model_dump(exclude={"space"}) == plain.model_dump(exclude={"space"})
    assert SPECS[method] == METHODS["AutoGLM with priors"] and method not in METHODS  # --heldout runs it not


def test_the_ablation_verdict_needs_wins_at_2b_and_4b_without_losing_hypervolume():
    from bench._heldout_report import ablation_table, ablation_wins

    better = knobbed_pair([(15.0, 0.6, (0.6, 1.0, 1.0)), (25.0, 0.5, (0.5, 1.0, 1.0))])
    worse = knobbed_pair([(15.0, 0.9, (0.9, 3.0, 3.0))])
    method = better.outcomes[-1].method

    assert ablation_wins(better, method, 1) == (False, True)  # nothing completed by 1B on either side: a tie
    assert ablation_wins(better, method, 2) == (True, True) and ablation_wins(worse, method, 4) == (False, False)
    earns, loses = ablation_table([better, better, worse], "train-knobs"), ablation_table([better, worse], "train-knobs")
    assert "knobs earn their place" in earns.notes[0] and "2/3 pairs at 2B" in earns.notes[0]
    assert "do NOT earn" in loses.notes[0]  # 1 of 2 is not most
    assert earns.rows[0][3:5] == ["— / —", "0.8 / 0.6"] and len(earns.rows) == 3


def test_pairs_where_the_two_tie_count_for_neither_side_of_the_verdict():
    from bench._heldout_report import ablation_table

    better = knobbed_pair([(15.0, 0.6, (0.6, 1.0, 1.0)), (25.0, 0.5, (0.5, 1.0, 1.0))])
    tie = knobbed_pair([(12.0, 0.8, (0.8, 2.0, 2.0)), (30.0, 0.7, (0.7, 2.0, 2.0))])  # the priors' own trials

    table = ablation_table([better, tie], "train-knobs")

    assert "knobs earn their place" in table.notes[0]  # better on 1, worse on none, hypervolume kept on both
    assert "1/1/0 at 2B, 1/1/0 at 4B" in table.notes[0]


def test_the_first_rung_ablation_moves_only_the_priors_method_s_first_rung_back(tmp_path):
    from bench._heldout import ABLATIONS, SPECS

    method, added, changed = ABLATIONS["early-first-rung"]
    plain, early = (method_settings(POOL["friedman1"], 0, tmp_path, m).tune for m in ("AutoGLM with priors", method))

    assert plain.early_stop.first_rung_frac == 1 / 9 and not added  # the default
    assert early.early_stop.first_rung_frac is None is changed["early_stop"]["first_rung_frac"]
    assert early.early_stop.enabled and early.early_stop.min_resource == plain.early_stop.min_resource == 250
    assert early.model_dump(exclude={"early_stop"}) == plain.model_dump(exclude={"early_stop"})
    assert SPECS[method] == METHODS["AutoGLM with priors"] and method not in METHODS


def test_the_short_startup_ablation_changes_only_the_priors_method_s_drawn_startup(tmp_path):
    from bench._heldout import ABLATIONS, SPECS
    from tune.sampler import startup_of

    method, added, changed = ABLATIONS["short-startup"]
    plain, short = (method_settings(POOL["friedman1"], 0, tmp_path, m).tune for m in ("AutoGLM with priors", method))

    assert not added and changed == {"startup_trials": 2}
    assert startup_of(plain.sampler, len(plain.objectives), plain.startup_trials) == 3  # the pool's (bench.pool)
    assert startup_of(short.sampler, len(short.objectives), short.startup_trials) == 2
    assert short.model_dump(exclude={"startup_trials"}) == plain.model_dump(exclude={"startup_trials"})
    assert SPECS[method] == METHODS["AutoGLM with priors"] and method not in METHODS


def test_the_baselines_keep_the_pool_s_evaluation_grid_whatever_tune_s_first_rung(tmp_path):
    for method in ("random search", "TPE", "TPE + Hyperband"):
        assert method_settings(POOL["digits"], 0, tmp_path, method).tune.early_stop.first_rung_frac is None
    assert method_settings(POOL["digits"], 0, tmp_path, "AutoGLM cold").tune.early_stop.first_rung_frac == 1 / 9


@pytest.mark.parametrize("name", ["portfolio-grace", "early-first-rung"])
def test_each_rung_and_share_ablation_changes_only_its_own_settings(name, tmp_path):
    from bench._heldout import ABLATIONS

    method, _, changed = ABLATIONS[name]
    plain, twin = (method_settings(POOL["digits"], 0, tmp_path, m).tune for m in ("AutoGLM with priors", method))
    rungs = changed.get("early_stop", {})

    assert twin.early_stop.model_dump(exclude=set(rungs)) == plain.early_stop.model_dump(exclude=set(rungs))
    assert all(getattr(twin.early_stop, k) == v != getattr(plain.early_stop, k) for k, v in rungs.items())
    assert twin.model_dump(exclude={"early_stop", *changed}) == plain.model_dump(exclude={"early_stop", *changed})
    assert all(getattr(twin, k) == v for k, v in changed.items() if k != "early_stop")


def test_an_unknown_ablation_is_refused_before_anything_runs():
    from bench.tune import run

    with pytest.raises(SystemExit):
        run(True, ["--ablation", "nope"])


def test_the_metric_share_ablation_turns_only_the_metric_share_on(tmp_path):
    from bench._heldout import ABLATIONS, SPECS
    from bench._heldout_report import ablation_table

    method, added, changed = ABLATIONS["metric-share"]
    plain, shared = (method_settings(POOL["friedman1"], 0, tmp_path, m).tune for m in ("AutoGLM with priors", method))
    assert plain.metric_share == 0 and shared.metric_share == changed["metric_share"] > 0 and not added
    assert shared.model_dump(exclude={"metric_share"}) == plain.model_dump(exclude={"metric_share"})
    assert SPECS[method] == METHODS["AutoGLM with priors"] and method not in METHODS

    worse = knobbed_pair([(15.0, 0.9, (0.9, 3.0, 3.0))])
    worse.outcomes[-1].method = method
    table = ablation_table([worse], "metric-share")
    assert "the change do NOT earn" in table.notes[0] and table.rows[0][4] == "0.8 / 0.9"
    assert "better / equal / worse: 0/1/0 at 1B, 0/0/1 at 2B, 0/0/1 at 4B" in table.notes[0]
    assert f"AutoGLM with priors / {method}" in table.title and "{'metric_share': 0.5}" in table.notes[1]
