"""The measuring side of the tuning benchmark (:mod:`bench.tune`): a method's search under a CPU-second budget,
its outcome on one seed, and the figures compared across methods (reach, hypervolume, side-by-side timings)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoglm.config import Settings
from tune import attributes as attrs


def search(settings: Settings, tune_dir: Path, budget_cpu_s: float, max_trials: int, pruner=None):
    """Trials until ``budget_cpu_s`` CPU-seconds are spent (tune's own Objective, storage and sampler).

    ``pruner``: an Optuna pruner judging the trials instead of tune's rule (single-objective studies with
    ``tune.early_stop.enabled``, so trials report at its rungs; see :class:`PrunerRungs`)."""
    from autoglm.measure import fixed_threads
    from tune.stage import open_search, sibling_callbacks

    task, space, study, objective = open_search(settings, tune_dir)
    if pruner is not None:
        study.pruner = pruner
        objective.rule = PrunerRungs(settings.tune.early_stop.min_resource)

    def stop_when_spent(study, _trial) -> None:
        if cpu_spent(study.get_trials(deepcopy=False)) >= budget_cpu_s:
            study.stop()

    callbacks = [stop_when_spent, *sibling_callbacks(settings, space, task)]
    with fixed_threads(settings.run.threads):
        study.optimize(objective, n_trials=max_trials, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
    return task, study.get_trials(deepcopy=False)


@dataclass(frozen=True)
class PrunerRungs:
    """Tune's rung hook (the interface of :class:`tune.early_stop.ParetoHalving` that the training loop calls)
    handing each evaluation to the study's Optuna pruner: ``trial.report`` at every ``every`` steps, then
    ``trial.should_prune`` -- how an Optuna user wires a pruner into a training loop."""

    every: int
    extrapolate: bool = False  # tune's curve extrapolation is its own rule's, not the pruner's

    def rungs(self, max_steps: int) -> list[int]:
        return list(range(self.every, max_steps, self.every))

    def should_stop(self, study, trial, rung: int, values, max_steps: int | None = None) -> bool:
        trial.report(values[0], rung)
        return trial.should_prune()


def cpu_of(trial) -> float:
    """A trial's CPU-seconds, as tune's Objective recorded them (0 for a trial that recorded none)."""
    return attrs.cpu_s(trial)


def cpu_spent(trials) -> float:
    """What a list of trials cost together, in CPU-seconds."""
    return sum(map(cpu_of, trials))


def better(a: float, b: float, direction: str) -> bool:
    """Whether ``a`` is strictly better than ``b`` for a metric optimized in ``direction``."""
    return a > b if direction == "maximize" else a < b


@dataclass
class Outcome:
    """One method on one seed: its trials in the order they ran; ``points`` are the completed trials'
    (metric, latency, energy), re-measured side by side by :func:`retime`."""

    method: str
    trials: list
    direction: str
    tune_dir: Path
    points: list[tuple[float, ...]] = field(default_factory=list)
    budget: float | None = None  # CPU-seconds: a trial ending past it was charged but does not count

    @property
    def counted(self) -> list:
        """The trials that ended within the budget, in the order they ran (all of them without one)."""
        if self.budget is None:
            return list(self.trials)
        out, spent = [], 0.0
        for t in self.trials:
            spent += cpu_of(t)
            if spent > self.budget:
                break
            out.append(t)
        return out

    @property
    def complete(self) -> list:
        return [t for t in self.counted if t.state.name == "COMPLETE"]

    def best(self) -> float:
        values = [t.values[0] for t in self.complete]
        return (max if self.direction == "maximize" else min)(values) if values else math.nan

    def reach(self, target: float) -> tuple[int, float] | None:
        """(training steps, CPU-seconds) spent until a completed trial is at least as good as ``target``."""
        if self.method == "default":  # its own run: the first evaluation as good as its last one
            history = attrs.HISTORY.get(self.trials[0], [])
            step = next((s for s, v in history if not better(history[-1][1], v, self.direction)), None)
            return (step, cpu_spent(self.trials)) if step is not None else None
        steps = cpu = 0.0
        for t in self.counted:
            steps += 0 if attrs.CACHE_HIT.get(t) else attrs.STEPS.get(t, 0)
            cpu += cpu_of(t)
            if t.state.name == "COMPLETE" and not better(target, t.values[0], self.direction):
                return int(steps), cpu
        return None

    def own_cpu(self, target: float) -> float | None:
        """CPU-seconds of the first completed trial at least as good as ``target`` alone: what its configuration
        costs to train and serve once, without the search around it (a trial that reused a cached model is
        charged the trial that trained it)."""
        first = next((t for t in self.complete if not better(target, t.values[0], self.direction)), None)
        if first is None:
            return None
        if attrs.CACHE_HIT.get(first):
            key = attrs.TRAINING_KEY.get(first)
            first = next((t for t in self.trials if attrs.TRAINING_KEY.get(t) == key
                          and not attrs.CACHE_HIT.get(t)), first)
        return cpu_of(first)

    def energy(self) -> str:
        computes = [attrs.COMPUTE.get(t) for t in self.trials if attrs.COMPUTE.on(t)]
        methods = sorted({c["energy_method"] for c in computes})
        return f"{sum(c['joules'] for c in computes):,.0f} J ({', '.join(methods) or 'none'})"


def hypervolumes(outcomes: list[Outcome], dirs: list[str], scale: list[Outcome] | None = None) -> dict[str, float]:
    """Each method's normalized hypervolume, all methods' points sharing one normalization and reference:
    min-max over ``scale``'s points (default: ``outcomes``'), so volumes at several budgets compare."""
    from tune.early_stop import pareto_fronts
    from tune.report import hypervolume

    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in dirs])

    def signed(o: Outcome):
        return np.array(o.points, dtype=float).reshape(-1, len(dirs)) * sign

    points = {o.method: signed(o) for o in outcomes}
    every = np.vstack([p for p in map(signed, scale or outcomes) if len(p)])
    low, span = every.min(axis=0), np.where(every.max(axis=0) > every.min(axis=0), np.ptp(every, axis=0), 1.0)
    reference = np.full(len(dirs), 1.1)
    out = {}
    for method, p in points.items():
        if not len(p):
            out[method] = 0.0
            continue
        norm = np.minimum((p - low) / span, 1.0)  # a point off the scale's range counts as its worst end
        front = norm[pareto_fronts(norm.tolist())[0]]
        out[method] = hypervolume(front, reference) / float(np.prod(reference))
    return out


def retime(task, outcomes: list[Outcome], batch: int = 32, rounds: int = 3) -> None:
    """Time every completed trial's served model again, all methods round-robin in one stretch.

    Each trial timed itself while its method ran, under whatever load the machine had then; comparing
    hypervolumes across methods needs the points measured side by side (rounds interleave the methods, the
    median of the rounds is kept). One intra-op thread, as the Triton models are served
    (compress.triton.intra_op_threads), and p50: on a shared machine the p95 of a few dozen runs is the
    neighbours' scheduling hiccups (about 5 ms here whatever the model), not the model.
    """
    from autoglm.config import MeasureSettings
    from autoglm.measure import profile
    from autoglm.tasks.predict import onnx_predictor

    measure = MeasureSettings(warmup=2, repeats=20)
    models = []
    for o in outcomes:
        for t in o.complete:
            folder = o.tune_dir / "trials" / f"{t.number:04d}"
            model_args = json.loads((folder / "metrics.json").read_text())["model_args"]
            inputs = {batch: task.example_inputs(batch, model_args=model_args)}
            predict = onnx_predictor(folder / attrs.VARIANT.get(t)["path"], threads=1)
            models.append((o, t.values[0], predict, inputs))
    timings: list[list[tuple[float, float]]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (_, _, predict, inputs) in enumerate(models):
            p = profile(predict, inputs, measure, threads=1)[batch]
            timings[i].append((p["p50_ms"], p["j_per_item"]))
    for (o, metric, _, _), timed in zip(models, timings, strict=True):
        o.points.append((metric, statistics.median(t[0] for t in timed), statistics.median(t[1] for t in timed)))


def mean(values) -> float | None:
    """The mean of the values present (a table cell is None where a seed never reached a target)."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
