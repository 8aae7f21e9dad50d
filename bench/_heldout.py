"""``bench tune --heldout``: tuning methods on the evaluation tasks of the pool, anytime up to 4x the default's compute.

For every evaluation task (:func:`bench.pool.eval_tasks`) and seed, the default runs once; its CPU-seconds are
the budget B of that pair. Each searching method then runs until it has spent 4B, and its best metric and
hypervolume are read off at every quarter of B (a trial counts from the compute at which it ended, see
:attr:`bench._tuning.Outcome.counted`). Methods:

- **default**: the pool task's default config trained once (a one-trial study with every knob fixed);
- **random search**, **TPE**: architecture + training knobs (the ``training`` preset: compression off, FP32
  served), no early stopping, ``max_steps`` searched;
- **TPE + Hyperband**: the same TPE with Optuna's HyperbandPruner on the metric alone (single objective), every
  trial on the searched range's longest schedule, evaluations reported to the pruner: the field's standard
  multi-fidelity baseline;
- **AutoGLM cold**: tune's TPE over architecture + training + compression with its multi-objective early stopping,
  the schedule's length searched (rungs judge a trial against schedules at least as long), nothing queued first;
- **AutoGLM with priors**: the same with the portfolio (``tune.portfolio``, learned on development tasks only by
  ``bench tune --learn-portfolio``) queued first; no per-task warm start.

Scoring and charging are bench.tune's (:mod:`bench._tuning`): the served model's validation metric, every trial's
CPU-seconds, hypervolume over (metric, p50 latency, J/inference) re-measured side by side after a pair's
searches, normalized over all of the pair's points at 4B so the volumes at 1B, 2B and 4B compare.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from autoglm.config import Settings, TuneSettings
from bench._tuning import Outcome, better, cpu_spent, hypervolumes, retime, search
from bench.pool import POOL, PoolTask, scaled

MAX_TRIALS = 500  # a bound, never reached: the CPU-second budget ends every search
HORIZON = 4  # searches run to 4B
MULTIPLES = (1, 2, 4)  # the tables' columns
GRID = tuple(k / 4 for k in range(1, 4 * HORIZON + 1))  # the plot's points, in units of B
# name -> (sampler, search space preset, early stopping, portfolio)
METHODS = {"random search": ("random", "training", None, False), "TPE": ("tpe", "training", None, False),
           "TPE + Hyperband": ("tpe", "training", "hyperband", False),
           "AutoGLM cold": ("tpe", "default", "pareto", False),
           "AutoGLM with priors": ("tpe", "default", "pareto", True)}
PRIORS, BASELINES = "AutoGLM with priors", ("random search", "TPE + Hyperband")
# ``bench tune --ablation NAME``: PRIORS beside a twin that differs in one change, name -> (the twin, knobs it adds
# to the searched space, tune settings it changes)
# the training loop's opt-in knobs (autoglm.tasks.training.LOOP_SPACE): optimizer, schedule, and feedback with the
# adaptive batch on it; the knobs conditional on these (betas, momentum, step decay, max_grad_accum) come along
LOOP_KNOBS = {"train.optimizer": {}, "train.schedule": {}, "train.feedback_every": {}}
ABLATIONS = {"train-knobs": (f"{PRIORS} + loop knobs", LOOP_KNOBS, {}),
             # half the drawn trials proposed for the metric alone (tune.sampler.MetricShare; opt-in, off by default)
             "metric-share": (f"{PRIORS} + metric share", {}, {"metric_share": 0.5}),
             # the first rung at the pool's min_resource, not at a ninth of the longest schedule (the default since
             # this ablation, run the other way round, earned it: on the MLP tasks min_resource is the first
             # evaluation, 250 of 3000 steps, where most drawn trials were stopped)
             "early-first-rung": (f"{PRIORS}, first rung at min_resource", {},
                                  {"early_stop": {"first_rung_frac": None}}),
             # the portfolio's entries unjudged at the first rung (recorded there for the others): the entry that
             # ended best on Friedman #1 (a lower learning rate) was behind a rival until a third of its schedule
             "portfolio-grace": (f"{PRIORS} + portfolio grace", {}, {"early_stop": {"portfolio_grace": 1}}),
             # 2 trials drawn at random after the portfolio, not the pool's 3 (bench.pool.SHARED; the tuner's own
             # default is max(4, 2 x objectives) = 6): the portfolio's 4 entries already spread over the space, and
             # at 2B a study has finished about 7 to 15 trials, few of them proposed by the model
             "short-startup": (f"{PRIORS}, 2 drawn start-up trials", {}, {"startup_trials": 2})}
ADDED = {twin: added for twin, added, _ in ABLATIONS.values()}  # method -> the knobs it adds to PRIORS' space
CHANGED = {twin: changed for twin, _, changed in ABLATIONS.values()}  # method -> the tune settings it changes
SPECS = METHODS | dict.fromkeys(ADDED, METHODS[PRIORS])  # every method's (sampler, preset, stopping, portfolio)
DIRS_REST = ["minimize", "minimize"]  # latency, energy


def method_settings(pool_task: PoolTask, seed: int, workdir: Path, method: str,
                    extra: tuple[str, ...] = ()) -> Settings:
    """A method's settings for one pool task and seed."""
    base = pool_task.settings(seed, workdir, extra)
    tune = base.tune.model_dump()
    if method == "default":
        from autoglm.tasks import task_class

        cls = task_class(base.task.name)
        fixed = {f"model.{k}": v for k, v in cls.check_model_args(base.task.model).items()}
        fixed |= {f"train.{k}": getattr(base.train, k) for k in cls.train_space}
        tune |= {"search_space": "training", "space": fixed, "early_stop": {**tune["early_stop"], "enabled": False},
                 "warm_start": None}
        portfolio = False
    else:
        sampler, preset, stopping, portfolio = SPECS[method]
        # Hyperband's trials share the longest schedule (its resource is the step); AutoGLM's search the schedule's
        # length, as random search's do: on a small table a long schedule overfits, the rungs then judge only
        # schedules at least as long, and a portfolio entry carries its own length (``steps_frac``)
        changed = CHANGED.get(method, {})
        tune |= {"sampler": sampler, "search_space": preset, "space": dict(pool_task.space) | ADDED.get(method, {}),
                 "warm_start": None, **changed,
                 "early_stop": {**tune["early_stop"], **changed.get("early_stop", {}),
                                "enabled": stopping is not None, "shared_schedule": stopping == "hyperband"}}
        if stopping != "pareto":  # the baselines evaluate on the pool's grid, whatever tune's rungs default to
            tune["early_stop"]["first_rung_frac"] = None
        if stopping == "hyperband":
            tune["objectives"] = ["metric"]
    if not portfolio:
        tune["portfolio"] = None
    return base.model_copy(update={"tune": TuneSettings.model_validate(tune)})


def _pruner(settings: Settings):
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=settings.tune.early_stop.min_resource,
                                          max_resource=settings.train.max_steps, reduction_factor=3)


@dataclass
class Pair:
    """One (task, seed): its budget B and every method's outcome (default first), searched to 4B."""

    task: str
    seed: int
    metric: str
    direction: str
    budget: float
    outcomes: list[Outcome]
    portfolio: str = ""  # where the priors method's portfolio came from (its provenance), as it was read

    def at(self, method: str, multiple: float) -> Outcome:
        """``method``'s outcome as it stood after ``multiple`` x B CPU-seconds (its points cut alike)."""
        full = next(o for o in self.outcomes if o.method == method)
        cut = Outcome(method, full.trials, full.direction, full.tune_dir, budget=multiple * self.budget)
        cut.points = full.points[:len(cut.complete)]
        return cut

    def volumes(self, multiple: float) -> dict[str, float]:
        return hypervolumes([self.at(o.method, multiple) for o in self.outcomes], [self.direction, *DIRS_REST],
                            scale=self.outcomes)

    def reach(self, method: str) -> float | None:
        """CPU-seconds, in units of B, ``method`` spent until a trial matched the default's final metric."""
        found = self.at(method, HORIZON).reach(self.outcomes[0].best())
        return None if found is None else found[1] / self.budget


def run_pair(name: str, seed: int, workdir: Path, factor: float = 1.0, methods=tuple(METHODS),
             extra: tuple[str, ...] = ()) -> Pair:
    """The default, then each method to 4B, then every point re-timed side by side; ``factor`` scales every
    schedule (:func:`bench.pool.scaled`: a smoke run's tiny budgets)."""
    pool_task = POOL[name] if factor == 1.0 else scaled(POOL[name], factor)
    where = Path(workdir) / name / str(seed)
    default = method_settings(pool_task, seed, where, "default", extra)
    task, trials = search(default, where / "default", 0.0, 1)
    budget = cpu_spent(trials)
    outcomes = [Outcome("default", trials, task.direction, where / "default")]
    portfolio = ""
    for method in methods:
        settings = method_settings(pool_task, seed, where, method, extra)
        if SPECS[method][3]:
            from tune.portfolio import configured_portfolio

            found = configured_portfolio(settings.tune)
            portfolio = f"learned from {found.provenance['learned_from'] or 'no task'}" if found else "none"
        pruner = _pruner(settings) if SPECS[method][2] == "hyperband" else None
        _, found = search(settings, where / method, HORIZON * budget, MAX_TRIALS, pruner=pruner)
        outcomes.append(Outcome(method, found, task.direction, where / method, budget=HORIZON * budget))
    retime(task, outcomes)
    for o in outcomes:  # the trials' storage-backed objects pickle; the search's files stay behind
        o.trials = list(o.trials)
    return Pair(name, seed, task.metric, task.direction, budget, outcomes, portfolio)


def warm_up(workdir: Path) -> None:
    """One tiny default run first: imports and the first ONNX Runtime sessions charge no method."""
    settings = method_settings(POOL["breast-cancer"], 0, workdir, "default", ("train.max_steps=20",))
    search(settings, Path(workdir) / "default", 0.0, 1)


def _pair_job(args) -> Pair:
    name, seed, workdir, factor, methods = args
    warm_up(Path(workdir) / "warm-up" / f"{name}-{seed}")
    return run_pair(name, seed, workdir, factor, methods)


def run_pairs(names: list[str], seeds: list[int], workdir: Path, workers: int = 1, factor: float = 1.0,
              wall_s: float | None = None, methods=tuple(METHODS)) -> tuple[list[Pair], list[tuple[str, int]]]:
    """(pairs done, pairs cut): every (task, seed), seed by seed, ``workers`` at a time in processes of their own
    (each trains with one thread and is charged its own CPU-seconds, so pairs side by side do not charge each
    other). ``wall_s``: the pairs not done by then are stopped and reported as cut, never half-counted."""
    jobs = [(n, s, str(workdir), factor, tuple(methods)) for s in seeds for n in names]
    if workers <= 1 and wall_s is None:
        return [_pair_job(j) for j in jobs], []
    end = None if wall_s is None else time.monotonic() + wall_s
    pool = get_context("spawn").Pool(max(1, workers))
    try:
        pending = [(j, pool.apply_async(_pair_job, (j,))) for j in jobs]
        done, cut = [], []
        for job, result in pending:
            try:
                done.append(result.get(None if end is None else max(1.0, end - time.monotonic())))
            except mp.TimeoutError:
                cut.append((job[0], job[1]))
        return done, cut
    finally:
        pool.terminate()  # pairs still running past the wall limit: their results are not counted anyway


def wins(pair: Pair, multiple: float) -> dict[str, tuple[bool, bool]]:
    """Per baseline: (priors' best metric strictly better, priors' hypervolume strictly higher) at ``multiple``."""
    volumes = pair.volumes(multiple)
    mine = pair.at(PRIORS, multiple).best()
    out = {}
    for base in BASELINES:
        theirs = pair.at(base, multiple).best()
        beats = not math.isnan(mine) and (math.isnan(theirs) or better(mine, theirs, pair.direction))
        out[base] = (beats, volumes[PRIORS] > volumes[base])
    return out
