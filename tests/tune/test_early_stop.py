"""Multi-objective early stopping: the Pareto successive-halving rule, alone and inside real Optuna studies."""

import optuna
import pytest

from tune import attributes as attrs
from tune.early_stop import ParetoHalving, RungCallback, compression_shift, dominates, pareto_fronts

# digits-like objectives: accuracy (higher is better), p95 latency and J/inference (lower is better)
DIRS = ("maximize", "minimize", "minimize")
TWO = ("maximize", "minimize")  # metric and latency


def rule(directions=DIRS, **kw) -> ParetoHalving:
    return ParetoHalving(directions, **{"reduction_factor": 3, "min_resource": 10, "warmup_trials": 3} | kw)


def test_dominates_and_fronts_minimize_every_objective():
    points = [(1.0, 1.0), (2.0, 2.0), (0.5, 3.0), (2.0, 2.0)]

    fronts = pareto_fronts(points)

    assert dominates((1.0, 1.0), (2.0, 2.0)) and not dominates((2.0, 2.0), (2.0, 2.0))
    assert fronts == [[0, 2], [1, 3]]


@pytest.mark.parametrize(("max_steps", "expected"), [(1000, [100, 300, 900]), (900, [100, 300]), (301, [100, 300]),
                                                     (100, []), (50, [])])
def test_rungs_grow_by_the_reduction_factor_and_never_include_the_last_step(max_steps, expected):
    halving = ParetoHalving(DIRS, reduction_factor=3, min_resource=100)

    assert halving.rungs(max_steps) == expected


def test_a_dominated_trial_is_stopped():
    others = [(0.95, 1.0, 1.0), (0.90, 2.0, 2.0), (0.92, 1.5, 1.5)]

    assert not rule().survives((0.50, 3.0, 3.0), others)


def test_a_diverged_trial_is_stopped_and_does_not_crowd_out_good_ones():
    loss = ("minimize", "minimize", "minimize")
    good = [(2.0 + i / 10, 1.0, 1.0) for i in range(8)]
    assert not rule(loss).survives((float("nan"), 5.0, 5.0), good)  # NaN compared false both ways: never stopped
    assert rule(loss).survives(good[0], [(float("nan"), 0.1, 0.1)] * 8 + good[1:])


def test_a_non_dominated_trial_is_kept_however_many_trials_beat_it_elsewhere():
    # worst latency and energy of all, but the best accuracy: first Pareto front, so it must stay
    others = [(0.90 - i / 100, 1.0, 1.0) for i in range(20)]

    assert rule().survives((0.99, 9.0, 9.0), others)


def test_the_best_fronts_up_to_one_in_reduction_factor_survive():
    # six trials on a line of single-objective values: ceil(6 / 3) = 2 survive
    halving = ParetoHalving(("minimize",), reduction_factor=3, min_resource=10, warmup_trials=1)
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]

    kept = [v for v in values if halving.survives((v,), [(o,) for o in values if o != v])]

    assert kept == [1.0, 2.0]


def test_warm_up_keeps_everything_until_the_rung_has_enough_trials():
    dominated, better = (0.1, 9.0, 9.0), [(0.9, 1.0, 1.0), (0.8, 1.0, 1.0)]

    during_warm_up = rule(warmup_trials=4).survives(dominated, better)
    after_warm_up = rule(warmup_trials=3).survives(dominated, better)

    assert during_warm_up and not after_warm_up


@pytest.mark.parametrize(("direction", "kept"), [("minimize", True), ("maximize", False)])
def test_the_direction_of_each_objective_decides_what_is_better(direction, kept):
    halving = ParetoHalving((direction, "minimize"), reduction_factor=2, min_resource=10, warmup_trials=1)
    others = [(2.0, 1.0), (3.0, 1.0), (4.0, 1.0)]  # equal latency: the metric decides

    assert halving.survives((1.0, 1.0), others) is kept


def test_rung_values_are_kept_in_the_study_storage():
    study = optuna.create_study(directions=list(DIRS))
    trial = study.ask()

    stop = rule().should_stop(study, trial, 10, [0.5, 1.0, 2.0])

    assert not stop  # alone at the rung: warm-up
    assert study.trials[0].user_attrs[attrs.rung(10).key] == [0.5, 1.0, 2.0]


def test_the_callback_judges_each_rung_once_with_the_latest_evaluation():
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    hook = RungCallback(rule(TWO), study, trial, ["metric", "latency"], {"latency": 2.0, "energy": 9.0}, max_steps=100)

    stops = [hook(step, step / 100) for step in (5, 25, 50, 95)]  # rungs 10, 30, 90 (evaluated late)

    recorded = study.trials[0].user_attrs
    assert stops == [False, False, False, False] and hook.stopped_at is None
    assert recorded["rung_10"] == [0.25, 2.0] and recorded["rung_30"] == [0.5, 2.0]
    assert recorded["rung_90"] == [0.95, 2.0]


def test_a_trial_is_judged_only_against_schedules_at_least_as_long_as_its_own():
    study = optuna.create_study(directions=["maximize", "minimize"])
    # three short schedules, nearly annealed by step 300: high accuracy early, as a short cosine gives
    for value in (0.80, 0.82, 0.84):
        rule(TWO).should_stop(study, study.ask(), 300, [value, 1.0], max_steps=350)
    long_but_behind, short_and_behind = study.ask(), study.ask()

    spared = rule(TWO).should_stop(study, long_but_behind, 300, [0.60, 1.0], max_steps=1000)
    judged = rule(TWO).should_stop(study, short_and_behind, 300, [0.60, 1.0], max_steps=300)

    assert not spared  # no schedule as long as its own at the rung yet: not stopped by annealed short ones
    assert judged  # the others' schedules are at least as long as its own: dominated, stopped
    assert long_but_behind.user_attrs[attrs.SCHEDULE_STEPS.key] == 1000


def _storage(kind, tmp_path):
    if kind == "inmemory":
        return optuna.storages.InMemoryStorage()
    backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    return optuna.storages.JournalStorage(backend)


def _training(halving):
    """A fake training loop: the metric climbs to the trial's 'quality'; latency is fixed before training."""

    def objective(trial):
        quality = trial.suggest_float("quality", 0.0, 1.0)
        hook = RungCallback(halving, trial.study, trial, ["metric", "latency"], {"latency": 1.0}, max_steps=100)
        for step in range(10, 101, 10):
            if hook(step, quality * step / 100):
                trial.set_user_attr("stopped_at", step)
                raise optuna.TrialPruned()
        return quality, 1.0

    return objective


@pytest.mark.parametrize("kind", ["inmemory", "journal"])
def test_the_rule_stops_trials_of_a_multi_objective_study_where_optuna_pruning_cannot(kind, tmp_path):
    study = optuna.create_study(storage=_storage(kind, tmp_path), study_name="es", directions=["maximize", "minimize"])
    probe = study.ask()
    with pytest.raises(NotImplementedError):
        probe.report(0.5, step=1)
    with pytest.raises(NotImplementedError):
        probe.should_prune()
    study.tell(probe, state=optuna.trial.TrialState.FAIL)
    for quality in (0.5, 0.6, 0.9, 0.1):
        study.enqueue_trial({"quality": quality})

    study.optimize(_training(rule(TWO)), n_trials=4)

    states = {t.params["quality"]: t.state.name for t in study.trials if t.params}
    assert states == {0.5: "COMPLETE", 0.6: "COMPLETE", 0.9: "COMPLETE", 0.1: "PRUNED"}
    stopped = next(t for t in study.trials if t.state.name == "PRUNED")
    assert stopped.user_attrs["stopped_at"] == 10 and "rung_30" not in stopped.user_attrs


def test_rung_records_survive_a_restart_and_judge_a_new_worker(tmp_path):
    study = optuna.create_study(storage=_storage("journal", tmp_path), study_name="es",
                                directions=["maximize", "minimize"])
    for quality in (0.7, 0.8, 0.9):
        study.enqueue_trial({"quality": quality})
    study.optimize(_training(rule(TWO)), n_trials=3)

    reopened = optuna.load_study(study_name="es", storage=_storage("journal", tmp_path))  # another process's view
    newcomer = reopened.ask()
    stop = rule(TWO).should_stop(reopened, newcomer, 10, [0.01, 1.0])

    assert stop


def _finished(study, metric, train_metric, **params):
    """A completed trial compressed with ``params``: it trained to ``train_metric`` and serves ``metric``."""
    dists = {"prune.ratio": optuna.distributions.FloatDistribution(0.0, 0.75, step=0.25),
             "quantize.mode": optuna.distributions.CategoricalDistribution(("none", "dynamic", "static"))}
    study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                              values=(metric, 1.0), user_attrs={"train_metric": train_metric}))


def test_rungs_judge_the_metric_a_trial_will_serve_after_the_compression_loss_seen_so_far():
    study = optuna.create_study(directions=["maximize", "minimize"])
    _finished(study, 0.60, 0.96, **{"prune.ratio": 0.75, "quantize.mode": "static"})  # pruning hard costs 0.36
    _finished(study, 0.54, 0.94, **{"prune.ratio": 0.75, "quantize.mode": "static"})  # and 0.40
    _finished(study, 0.95, 0.96, **{"prune.ratio": 0.0, "quantize.mode": "static"})
    assert compression_shift(study, {"prune.ratio": 0.75, "quantize.mode": "static"}) == pytest.approx(-0.38)
    assert compression_shift(study, {"prune.ratio": 0.0, "quantize.mode": "dynamic"}) == 0.0  # never seen
    assert compression_shift(study, {}) == 0.0

    pruned, plain = study.ask(), study.ask()
    hooks = {name: RungCallback(rule(TWO, warmup_trials=1), study, trial, ["metric", "latency"], {"latency": 1.0},
                                max_steps=100, compression=compression)
             for name, trial, compression in (("plain", plain, {"prune.ratio": 0.0, "quantize.mode": "static"}),
                                              ("pruned", pruned, {"prune.ratio": 0.75, "quantize.mode": "static"}))}
    assert hooks["plain"](10, 0.80) is False

    stopped = hooks["pruned"](10, 0.90)  # ahead in training, but serves about 0.52: behind the other one

    assert stopped and study.trials[pruned.number].user_attrs["rung_10"] == pytest.approx([0.52, 1.0])
    assert study.trials[plain.number].user_attrs["rung_10"] == pytest.approx([0.79, 1.0])


def test_a_trial_proposed_for_the_metric_is_judged_on_the_metric_alone():
    """Second-best accuracy but the slowest (served uncompressed): dominated by the best one, so stopped on Pareto
    rank; among the top third by accuracy, so kept when it was proposed for the metric alone."""
    others = [(0.95, 1.0, 1.0), (0.80, 0.5, 0.5), (0.70, 0.5, 0.5), (0.60, 0.4, 0.4), (0.50, 0.3, 0.3)]
    own = (0.90, 3.0, 3.0)
    assert not rule().survives(own, others) and rule().survives(own, others, only=0)
    assert not rule().survives((0.75, 3.0, 3.0), others, only=0)  # fourth of six by accuracy: stopped

    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ((0.95, 1.0), (0.80, 0.5), (0.70, 0.5)):
        rival = study.ask()
        attrs.rung(10).set(rival, list(values))
        study.tell(rival, list(values))
    plain, proposed = study.ask(), study.ask()
    attrs.PROPOSED_FOR.set(proposed, "metric")
    judged = [RungCallback(rule(TWO), study, t, ["metric", "latency"], {"latency": 3.0}, max_steps=100)(10, 0.9)
              for t in (plain, proposed)]
    assert judged == [True, False]  # stopped / kept


def test_a_portfolio_entry_passes_its_grace_rungs_unjudged_but_recorded():
    """Behind a faster, cheaper rival at the first two rungs (a lower learning rate): stopped at the first one as a
    drawn trial, or with no grace; with a grace of two rungs it reaches the third, where it is judged again."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    rival = study.ask()
    for rung, value in ((10, 0.8), (30, 0.85), (90, 0.86)):
        attrs.rung(rung).set(rival, [value, 1.0])
    study.tell(rival, [0.86, 1.0])

    def run(grace, entry):
        trial = study.ask()
        if entry:
            attrs.PORTFOLIO.set(trial, 0)
        hook = RungCallback(rule(TWO, warmup_trials=1, portfolio_grace=grace), study, trial, ["metric", "latency"],
                            {"latency": 2.0}, max_steps=100)
        stops = []
        for step, value in ((10, 0.5), (30, 0.7), (90, 0.8)):
            stops.append(hook(step, value))
            if stops[-1]:  # the training loop ends there
                break
        return stops, trial

    (drawn, _), (ungraced, _), (graced, trial) = run(2, False), run(0, True), run(2, True)

    assert drawn == ungraced == [True]  # dominated at the first rung: stopped there
    assert graced == [False, False, True]  # two rungs of grace, then dominated at the third: stopped
    assert study.trials[trial.number].user_attrs["rung_10"] == [0.5, 2.0]  # recorded for the others
