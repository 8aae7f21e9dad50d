"""Tuning: default hyperparameters vs random search vs TPE vs AutoGLM at equal CPU-second budgets, 3 seeds.

Four methods, the design's headline comparison, and one ablation; each seed (``run.seed``: initialization,
data order, sampler) runs all of them on the same machine one after the other, AutoGLM right after the default
(goal 1 divides one's CPU-seconds by the other's, and back to back they see the least drift in the load):

- **default**: the task's shipped config (``configs/<task>.toml``; charlm's are nanoGPT's CPU
  shakespeare_char settings) trained for the whole budget, as a one-trial study with every knob fixed;
- **random search** and **TPE, no early stopping**: architecture + training knobs (the ``training``
  preset; compression off, so they serve FP32 ONNX), the classic hyperparameter search;
- **AutoGLM**: TPE over architecture + training + compression (the ``default`` preset) with
  multi-objective early stopping on a **shared schedule** (``tune.early_stop.shared_schedule``: every trial's
  ``max_steps`` is the searched range's longest, and the rungs decide how far each trial trains, as in
  Hyperband/ASHA; random search and TPE search ``max_steps``, their only way to make a trial cheaper).
  It is **warm-started**: its first trial is ``Setup.warm_start`` as ``tune.warm_start`` (the shipped model
  and training values clipped into the searched ranges, with the table's changes on top: digits starts from 16
  channels at lr 6e-3 served with static INT8, charlm from 2 layers at lr 4e-3 served with dynamic INT8, the
  cheapest points the attainability tables found), queued with ``study.enqueue_trial`` and sampled, early-stopped and
  charged like any other trial. Only AutoGLM searches compression, so the compression ranges
  (``Setup.compression_space``) are its alone;
- **AutoGLM, cold start**: the same without the warm start, so the table tells what the search does on its own
  and what the prior adds. The goals are judged on AutoGLM.

TPE, with or without early stopping, draws ``tune.startup_trials`` random trials before it models (3 on both
tasks: a budget fits about three to twelve trials, and with Optuna's usual 6 to 10 TPE would never leave its
random start-up). AutoGLM's warm start and compression siblings come on top (:class:`tune.sampler.DrawnStartup`):
counted, they would end the start-up with one trained model as TPE's only data, and TPE would then sample
next to it.

Every trial is scored the same way (the served model's validation metric, p95 latency at batch 32, J/inference)
and charged the same way (its CPU-seconds: training, compression, scoring and timing).

Budget, in CPU-seconds: the default runs first, trained for ``Setup.default_steps`` (digits: twice its shipped
600 steps, so a search fits several trials; charlm: nanoGPT's 2000), and what it spent is the budget B of that
seed, so the default uses the whole budget by construction and every searching method gets the same B. Not
``tune.timeout_s``: wall time on a shared machine depends on the neighbours' load, while CPU-seconds charge a
method only for its own work. Not a trial count: early stopping exists to make trials cheaper, so equal trials
would not be equal compute. Trials start while a method has spent less than B; the last one may overrun: it is
charged (the compute column shows what was really spent) but its result is not counted. A warm-up trial first
absorbs one-time costs (imports, first ONNX Runtime sessions), which would otherwise fall on seed 0's default.

``steps to reach`` / ``CPU-s to reach`` add up every trial (stopped ones included) until the first completed one
at least as good as the default's final metric; the default's own row gives its first evaluation as good as its
last, and its whole budget. Hypervolume is computed per seed over all methods' completed points, min-max
normalized, against the reference point 1.1 in every objective, divided by its maximum (1.1^3). For it the
points' latency (p50 at batch 32, one thread) and energy are re-measured side by side after the seed's
searches (see :func:`retime`): a trial's own timing depends on the load while it ran, and identical trials of
two methods (random search and TPE draw the same start-up trials from the same seed) differed several-fold.

``--quick`` runs digits only (about 10 minutes on two cores); the full run adds charlm (about 17 minutes per
seed). Each task has an attainability table (:func:`attainability`: the default beside hand-picked
configurations at 15-50% of its compute, trained alone; digits on 9 seeds, about 4 minutes, charlm on one,
about 7), which says whether any configuration can meet goal 1 at all.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autoglm.config import Settings, TuneSettings, load_settings
from bench._tuning import Outcome, better, cpu_spent, hypervolumes, mean, retime, search
from bench.harness import Table
from tune import attributes as attrs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEEDS = (0, 1, 2)
MAX_TRIALS = 500  # a bound, never reached: the CPU-second budget ends every search
# name -> (sampler, search space preset, early stopping)
METHODS = {"random search": ("random", "training", False), "TPE, no early stopping": ("tpe", "training", False),
           "AutoGLM": ("tpe", "default", True), "AutoGLM, cold start": ("tpe", "default", True)}
WARM = "AutoGLM"  # the one method whose first trial is the task's tune.warm_start; its cold twin is the ablation
# AutoGLM runs right after the default: goal 1 divides its CPU-seconds by the default's, and measured back to
# back the two see the least drift in the machine's load (a neighbour's load changes what a CPU-second buys)
RUN_ORDER = (WARM, *(m for m in METHODS if m != WARM))


@dataclass(frozen=True)
class Setup:
    """One task's comparison: ranges narrowed for every searching method alike, settings shared by all methods."""

    task: str
    default_steps: int  # the default's training steps: they set the budget
    space: dict[str, Any]
    overrides: tuple[str, ...]
    compression_space: dict[str, Any] = field(default_factory=dict)  # AutoGLM's alone: only it compresses
    # configurations trained alone beside the default (see :func:`attainability`): dotted knob -> value
    probes: tuple[dict[str, Any], ...] = ()
    probe_seeds: tuple[int, ...] = (0,)  # the seeds they are trained on
    # AutoGLM's first trial (tune.warm_start), picked on this very task: digits and Shakespeare are development
    # tasks of the pool (bench.pool), so this comparison measures the tuner where it was developed; the shipped
    # configs carry no warm start, and the held-out benchmark (``tune --heldout``) uses none
    warm_start: dict[str, Any] = field(default_factory=dict)


# Trials are kept shorter than the default's run (max_steps capped) so a search fits several into its budget;
# the rungs (min_resource x 3^k) fall inside those trials. Pruned models fine-tune briefly (50 steps already
# recover digits, see compress.prune.KNOBS). Every method evaluates at the same steps (every min_resource).
DIGITS_SPACE = {"model.channels": {"high": 32}, "model.hidden": {"high": 128}, "model.dropout": {"high": 0.3},
                "train.max_steps": {"high": 400}}
# charlm's schedules reach 1200 steps: the cheapest configuration measured to reach the default's loss (2 layers
# at lr 4e-3, see the attainability table) needs about 1200, and a range ending below that holds no trial that can
CHARLM_SPACE = {"model.n_layer": {"high": 4}, "model.n_embd": {"choices": [64, 96, 128]},
                "model.block_size": {"choices": [32, 64]}, "train.max_steps": {"high": 1200}}
SETUPS = {
    "digits": Setup("digits", 1200, DIGITS_SPACE, (
        "compress.exporter='legacy'", "compress.prune.finetune_steps=50", "tune.startup_trials=3",
        "tune.early_stop.min_resource=50", "tune.early_stop.warmup_trials=1", "tune.early_stop.shared_schedule=true"),
        # a 50-step fine-tune brings back half the channels pruned, not three quarters (75% lost 10 to 35
        # accuracy points in the bench's trials): the ratio stops at 0.5
        {"prune.ratio": {"high": 0.5}},
        # the shipped CNN on the searched range's longest schedule; the warm start (16 channels at lr 6e-3 on
        # it, picked on seeds 3-8, which the comparison does not run); batch 128 at lr 6e-3, the point found by
        # hand to reach the default on the most seeds. 270 validation images make one image 0.37 points, so the
        # table runs 9 seeds to tell a configuration from a draw
        probes=({"train.max_steps": 400}, {"model.channels": 16, "train.lr": 6e-3, "train.max_steps": 400},
                {"train.max_steps": 300, "train.batch_size": 128, "train.lr": 6e-3}),
        probe_seeds=tuple(range(9)),
        # 16 channels at lr 6e-3 served with static INT8: within half a validation image of the default's accuracy
        # on average over 9 seeds at 15-26% of its compute (the attainability table), picked on seeds 3-8
        warm_start={"model.channels": 16, "train.lr": 6e-3, "quantize.mode": "static"}),
    "charlm": Setup("charlm", 2000, CHARLM_SPACE, (
        "compress.exporter='legacy'", "compress.prune.finetune_steps=100", "tune.startup_trials=3",
        "tune.early_stop.min_resource=100", "tune.early_stop.warmup_trials=1", "tune.early_stop.shared_schedule=true"),
        probes=(
        # the most compute-efficient configurations found by hand, sized from their measured cost per token: the
        # shipped architecture on a short schedule at a higher learning rate, and two layers instead of four
        # (about 1.7x cheaper per token, nearly as good per token) on the searched range's longest schedule and
        # a shorter one; the 2-layer point is charlm's tune.warm_start
        {"train.lr": 3e-3, "train.max_steps": 800},
        {"model.n_layer": 2, "train.lr": 4e-3, "train.max_steps": 1000},
        {"model.n_layer": 2, "train.lr": 4e-3, "train.max_steps": 1200}),
        # 2 layers at lr 4e-3 served with dynamic INT8: trained 1200 steps it reaches the 4-layer default's loss
        # with about a third of its CPU-seconds (the attainability table)
        warm_start={"model.n_layer": 2, "train.lr": 4e-3, "quantize.mode": "dynamic"}),
}


def _settings(setup: Setup, seed: int, workdir: Path, method: str, probe: dict[str, Any] | None = None) -> Settings:
    """A method's settings on one seed; ``probe`` (method "default" only) changes some of the default's values."""
    base = load_settings(CONFIGS / f"{setup.task}.toml", [
        f"run.root='{workdir / 'runs'}'", f"run.cache_dir='{workdir / 'cache'}'", f"run.seed={seed}", *setup.overrides])
    tune = base.tune.model_dump()
    if method == "default":
        from autoglm.tasks import task_class

        cls = task_class(setup.task)
        fixed = {f"model.{k}": v for k, v in cls.check_model_args(base.task.model).items()}
        fixed |= {f"train.{k}": getattr(base.train, k) for k in cls.train_space}
        fixed["train.max_steps"] = setup.default_steps
        fixed |= probe or {}
        tune |= {"search_space": "training", "space": fixed, "early_stop": {**tune["early_stop"], "enabled": False},
                 "warm_start": None}
    else:
        sampler, preset, early_stop = METHODS[method]
        space = dict(setup.space) | (setup.compression_space if preset == "default" else {})
        tune |= {"sampler": sampler, "search_space": preset, "space": space,
                 "early_stop": {**tune["early_stop"], "enabled": early_stop},
                 "warm_start": (setup.warm_start or None) if method == WARM else None}
    tune["portfolio"] = None  # this comparison is warm start vs cold; the priors are bench tune --heldout's
    return base.model_copy(update={"tune": TuneSettings.model_validate(tune)})


def run_seed(setup: Setup, seed: int, workdir: Path, max_trials: int = MAX_TRIALS):
    """(task, budget B, outcomes of every method in METHODS order): the default first, its CPU-seconds then
    budget the rest, which run in RUN_ORDER."""
    default_dir = workdir / f"{seed}" / "default"
    task, trials = search(_settings(setup, seed, workdir, "default"), default_dir, 0.0, 1)
    budget, by_method = cpu_spent(trials), {}
    for method in RUN_ORDER:
        tune_dir = workdir / f"{seed}" / method
        _, trials_of_method = search(_settings(setup, seed, workdir, method), tune_dir, budget, max_trials)
        by_method[method] = Outcome(method, trials_of_method, task.direction, tune_dir, budget=budget)
    outcomes = [Outcome("default", trials, task.direction, default_dir), *(by_method[m] for m in METHODS)]
    retime(task, outcomes)
    return task, budget, outcomes


def compare(setup: Setup, seeds: tuple[int, ...], workdir: Path, max_trials: int = MAX_TRIALS) -> Table:
    """Run every method on each seed; one table with a row per (seed, method), means, and the goals as notes."""
    rows, goal_40, goal_random, per_method = [], [], [], {}
    warm_up = _settings(replace(setup, default_steps=20), seeds[0], workdir / "warm-up", "default")
    search(warm_up, workdir / "warm-up", 0.0, 1)  # one-time costs (imports, first sessions) charge no method
    for seed in seeds:
        task, budget, outcomes = run_seed(setup, seed, workdir, max_trials)
        volumes = hypervolumes(outcomes, [task.direction, "minimize", "minimize"])
        target = outcomes[0].best()
        for o in outcomes:
            reached = o.reach(target) or (None, None)
            states = [t.state.name for t in o.trials]
            own = o.own_cpu(target)
            best = None if math.isnan(o.best()) else o.best()  # None ('—'): no trial ended within the budget
            row = [seed, o.method, best, *reached, None if own is None else f"{own:.1f} ({own / budget:.1%})",
                   f"{states.count('COMPLETE')}/{states.count('PRUNED')}/{states.count('FAIL')}", cpu_spent(o.trials),
                   o.energy(), volumes[o.method]]
            rows.append(row)
            per_method.setdefault(o.method, []).append(row)
        rows[-len(outcomes)][0] = f"{seed} (B = {budget:.1f} CPU-s)"
        by_method = {o.method: o for o in outcomes}
        rand, auto = by_method["random search"], by_method["AutoGLM"]
        reached = auto.reach(target)
        share = reached[1] / budget if reached else None
        own = auto.own_cpu(target)
        goal_40.append((share is not None and share <= 0.4,
                        f"seed {seed}: {f'{share:.1%}' if share is not None else 'not reached'}"
                        + (f", the configuration found alone {own / budget:.1%}" if own is not None else "")))
        beats = better(auto.best(), rand.best(), task.direction) and volumes["AutoGLM"] > volumes["random search"]
        goal_random.append((beats, f"seed {seed}: {auto.best():.4g} vs {rand.best():.4g}, hypervolume "
                                   f"{volumes['AutoGLM']:.3f} vs {volumes['random search']:.3f}"))
    for method, mine in per_method.items():
        steps = mean(r[3] for r in mine)
        rows.append(["mean", method, mean(r[2] for r in mine), None if steps is None else round(steps),
                     mean(r[4] for r in mine), "", "", statistics.fmean(r[7] for r in mine), "",
                     statistics.fmean(r[9] for r in mine)])
    metric = task.metric
    columns = ["seed", "method", f"final val metric ({metric})", f"steps to reach default's {metric}",
               "CPU-s to reach", "that configuration alone: CPU-s (of B)", "trials done/stopped/failed",
               "compute CPU-s", "energy", "hypervolume"]
    notes = [_goal_note(f"AutoGLM reaches the default configuration's final validation {metric} with ≤ 40% of "
                        "its compute", goal_40),
             _goal_note(f"at equal budget AutoGLM beats random search's best {metric} and hypervolume", goal_random),
             f"searched ranges, narrowed alike for random search, TPE and AutoGLM: {setup.space}; the default "
             f"trains {setup.default_steps} steps; shared settings: {', '.join(setup.overrides)}",
             f"AutoGLM alone is warm-started: its first trial is the shipped configuration clipped into the ranges, "
             f"with {_warm_start(setup)} (bench.tune.SETUPS' warm start, picked on this development task; queued, "
             "then early-stopped "
             "and charged like any trial); 'AutoGLM, cold start' is the same method without it, the ablation that "
             "shows what the warm start and what the search contributes; AutoGLM's compression ranges: "
             f"{setup.compression_space or 'as declared by compress'}",
             "AutoGLM trains every trial on one schedule, the searched range's longest train.max_steps "
             "(tune.early_stop.shared_schedule): its rungs decide how far each trial gets; random search and TPE "
             "search max_steps, their only way to make a trial cheaper",
             "final val metric: the best completed trial's served model (AutoGLM: compressed) on validation data; "
             "'—': never reached; the means of the 'to reach' columns are over the seeds that reached it",
             "'to reach' counts the whole search up to the first trial as good as the default (the goal's "
             "measure); 'that configuration alone' is that trial's own CPU-seconds, what the configuration the "
             "search found costs to train and serve without the search around it",
             "equal budget: a method starts trials while it has spent less than B, and the one that ends past B "
             "is charged (compute column) but not counted (final metric, reach, hypervolume)",
             "hypervolume over (metric, p50 latency at batch 32, J/inference) with latency and energy re-measured "
             "side by side after the searches (one thread, 3 interleaved rounds); energy is the estimate "
             "(CPU-seconds × W/core) where no NVML/RAPL counter exists, labelled as such",
             f"random search and TPE share a seed, and TPE's first {_startup(setup)} trials are random: up to "
             "there both methods run the same configurations"]
    return Table(f"{setup.task}: tuning methods at equal compute (budget B = the default's CPU-seconds, per seed)",
                 columns, rows, notes)


def attainability(setup: Setup, workdir: Path) -> Table:
    """Whether any configuration reaches the default's final metric with <= 40% of its compute, searched or not.

    Goal 1 asks a search to find and train such a configuration inside 40% of B. This trains the default and
    each of ``setup.probes`` (configurations picked by hand to be compute-efficient) alone, one after the
    other, charged and scored like trials, on each of ``setup.probe_seeds``: if none gets there, no search
    method can, whatever it samples.
    """
    rows, per_config = [], {}  # per_config: name -> [(metric, cpu, fraction of the default's, reaches)]
    for seed in setup.probe_seeds:
        runs = []  # (probe, its one-trial outcome); the default ({}) first
        for i, probe in enumerate(({}, *setup.probes)):
            tune_dir = workdir / f"{seed}" / f"probe-{i}"
            task, trials = search(_settings(setup, seed, workdir, "default", probe), tune_dir, 0.0, 1)
            runs.append((probe, Outcome("default", trials, task.direction, tune_dir)))
        default_cpu, target = cpu_spent(runs[0][1].trials), runs[0][1].best()
        for probe, done in runs:
            cpu, metric = cpu_spent(done.trials), done.best()
            history = attrs.HISTORY.get(done.trials[0], []) if done.trials else []
            name = ", ".join(f"{k}={v}" for k, v in probe.items()) or "the default"
            share, reaches = cpu / default_cpu, not better(target, metric, task.direction)
            per_config.setdefault(name, []).append((metric, cpu, share, reaches))
            rows.append([seed, name, metric, cpu, f"{share:.0%}", reaches,
                         " ".join(f"{step}:{value:.3f}" for step, value in history)])
    if len(setup.probe_seeds) > 1:  # one seed's verdict can be a draw; the means say what a configuration is
        for name, runs in per_config.items():
            rows.append(["mean", name, mean(r[0] for r in runs), mean(r[1] for r in runs),
                         f"{mean(r[2] for r in runs):.0%}", f"{sum(r[3] for r in runs)} of {len(runs)} seeds", ""])
    seeds = ", ".join(map(str, setup.probe_seeds))
    return Table(f"{setup.task}: can any configuration reach the default's {task.metric} with ≤ 40% of its compute? "
                 f"(seed{'s' if len(setup.probe_seeds) > 1 else ''} {seeds})",
                 ["seed", "configuration (changes to the default)", f"final val {task.metric}", "compute CPU-s",
                  "of the default's", f"reaches the default's {task.metric}",
                  f"{task.metric} during training (step:value)"], rows,
                 ["each row is one training of that configuration alone, trained, exported (FP32), scored and "
                  "charged like a trial, one after the other on the same machine; each seed's default sets its "
                  "target and its 100%",
                  "the probes were picked by hand for their measured cost per step and their loss per step; they "
                  "are not searched by any method, only a measure of what a search could find",
                  "mean rows: each configuration over the seeds (the 'reaches' column counts the seeds where it "
                  "does)"])


def _warm_start(setup: Setup) -> str:
    return ", ".join(f"{k} = {v}" for k, v in setup.warm_start.items()) or "compression off"


def _startup(setup: Setup) -> int:
    from tune.sampler import make_sampler

    settings = load_settings(CONFIGS / f"{setup.task}.toml", list(setup.overrides))
    return make_sampler("tpe", 0, len(settings.tune.objectives), settings.tune.startup_trials).startup


def _goal_note(goal: str, per_seed: list[tuple[bool, str]]) -> str:
    verdict = "met" if all(ok for ok, _ in per_seed) else "NOT met"
    return f"goal: {goal} on every seed ({'; '.join(text for _, text in per_seed)}): **{verdict}**"


def run(quick: bool, args: list[str] | None = None) -> list[Table]:
    """The comparison on digits and charlm; ``--heldout``: the pool's evaluation tasks anytime to 4B
    (:mod:`bench._heldout`); ``--learn-portfolio``: learn ``tune/portfolio.json`` on the development tasks."""
    if args:
        return _pool_run(quick, args)
    tables = []
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-tune-") as tmp:
        for name in (["digits"] if quick else ["digits", "charlm"]):
            tables.append(compare(SETUPS[name], SEEDS, Path(tmp) / name))
            if SETUPS[name].probes:
                tables.append(attainability(SETUPS[name], Path(tmp) / name / "attainability"))
    return tables


def _pool_run(quick: bool, args: list[str]) -> list[Table]:
    import argparse

    from bench._heldout import ABLATIONS

    parser = argparse.ArgumentParser(prog="python -m bench tune")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--heldout", action="store_true", help="anytime comparison on the evaluation tasks")
    mode.add_argument("--ablation", choices=sorted(ABLATIONS),
                      help="AutoGLM with priors without / with this change, anytime to 4B (default: the dev tasks)")
    mode.add_argument("--learn-portfolio", action="store_true", help="learn tune/portfolio.json on the dev tasks")
    parser.add_argument("--tasks", help="comma-separated pool tasks (default: the evaluation tasks)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per task (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="(task, seed) pairs run side by side")
    parser.add_argument("--wall-min", type=float, help="--heldout, --ablation: stop pairs still running after this many minutes")
    options = parser.parse_args(args)
    tasks = options.tasks.split(",") if options.tasks else None
    if options.heldout or options.ablation:
        from bench._heldout_report import heldout

        return heldout(quick, tasks, options.seeds, options.workers, options.wall_min, options.ablation)
    from bench._portfolio import learn

    return learn(quick, options.workers)
