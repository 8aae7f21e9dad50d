"""Multi-objective early stopping: successive halving by Pareto rank.

Optuna's pruners refuse multi-objective studies (``trial.report``/``should_prune`` raise there). Yet
only the task metric evolves while a model trains: latency and energy follow from the architecture and
the compression settings, and a trial measures them *before* training. So at each rung (``min_resource
× reduction_factor^k`` steps) a trial records (intermediate metric, latency, energy) in the study's
storage as a user attribute, and survives only if its Pareto front is among the fronts holding the best
``1/reduction_factor`` of that rung's population. A non-dominated trial is therefore never stopped.
Because the rung values live in the storage, the rule works across processes, hosts and restarts.

The metric a trial is judged on is the one it will *serve*: training sees the uncompressed model, so at a
rung the metric is shifted by the compression loss observed so far for the trial's compression settings
(the mean served-minus-trained metric of completed trials compressed the same way; none yet: no shift).
Otherwise a heavily pruned trial would pass every rung on its uncompressed metric and collapse only once
compressed, its whole training spent.

A trial is judged only against trials whose schedules are at least as long as its own (``max_steps`` is
searched): at the same step a shorter schedule has decayed its learning rate further, which lowers its
loss early without making it the better configuration, and would stop the long trials that end best.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tune import attributes as attrs


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all objectives minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Non-dominated sorting: indices of the first front, then of the next, ... (minimization)."""
    remaining = set(range(len(points)))
    fronts = []
    while remaining:
        front = [i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)]
        fronts.append(sorted(front))
        remaining -= set(front)
    return fronts


@dataclass(frozen=True)
class ParetoHalving:
    """The stopping rule; ``directions`` are per objective ("minimize"/"maximize")."""

    directions: tuple[str, ...]
    reduction_factor: int = 3
    min_resource: int = 100
    warmup_trials: int = 4

    def rungs(self, max_steps: int) -> list[int]:
        """Steps at which a trial of ``max_steps`` is judged (never at its very end: it finishes then)."""
        steps, k = [], 0
        while (step := self.min_resource * self.reduction_factor ** k) < max_steps:
            steps.append(step)
            k += 1
        return steps

    def _minimized(self, values: Sequence[float]) -> tuple[float, ...]:
        """Every objective minimized; a value that is not finite (a diverged loss: NaN) is the worst there is,
        since NaN compares false both ways and would never be dominated."""
        return tuple(math.inf if not math.isfinite(v) else -v if d == "maximize" else v
                     for v, d in zip(values, self.directions, strict=True))

    def survives(self, own: Sequence[float], others: Sequence[Sequence[float]]) -> bool:
        """Whether a trial with ``own`` values stays, given the other trials' values at the same rung."""
        population = [self._minimized(own)] + [self._minimized(o) for o in others]
        if len(population) < self.warmup_trials:
            return True
        keep = math.ceil(len(population) / self.reduction_factor)
        kept = 0
        for front in pareto_fronts(population):
            if 0 in front:
                return True
            kept += len(front)
            if kept >= keep:
                return False
        return False  # pragma: no cover - index 0 is in some front

    def should_stop(self, study, trial, rung: int, values: Sequence[float], max_steps: int | None = None) -> bool:
        """Record this trial's rung values in the storage and decide against the records of the other trials
        whose schedules are at least ``max_steps`` long (every other trial when None, or when unrecorded)."""
        at_rung = attrs.rung(rung)
        if max_steps is not None:
            attrs.SCHEDULE_STEPS.set(trial, max_steps)
        at_rung.set(trial, list(values))
        others = [at_rung.get(t) for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and at_rung.on(t)
                  and (max_steps is None or attrs.SCHEDULE_STEPS.get(t, math.inf) >= max_steps)]
        return not self.survives(values, others)


def compression_shift(study, compression: Mapping[str, Any], metric_index: int = 0) -> float:
    """Mean (served metric - trained metric) of the completed trials whose compression parameters equal
    ``compression``; 0.0 when there are none (or nothing is compressed)."""
    import optuna

    if not compression:
        return 0.0
    shifts = [t.values[metric_index] - attrs.TRAIN_METRIC.get(t)
              for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if attrs.TRAIN_METRIC.on(t) and all(t.params.get(k) == v for k, v in compression.items())]
    return statistics.fmean(shifts) if shifts else 0.0


class RungCallback:
    """The ``on_eval`` hook of the training loop: at rung steps, ask the rule whether to stop.

    ``cost`` holds the trial's already-measured objectives other than the metric (latency, energy),
    aligned with ``objectives``; ``compression`` the trial's compression parameters, whose observed loss
    shifts the metric (see the module).
    """

    def __init__(self, rule: ParetoHalving, study, trial, objectives: Sequence[str], cost: dict[str, float],
                 max_steps: int, compression: Mapping[str, Any] | None = None):
        self.rule, self.study, self.trial = rule, study, trial
        self.objectives, self.cost = list(objectives), cost
        self.compression = dict(compression or {})
        self.pending, self.max_steps = rule.rungs(max_steps), max_steps
        self.stopped_at: int | None = None

    def __call__(self, step: int, metric: float) -> bool:
        while self.pending and step >= self.pending[0]:
            rung = self.pending.pop(0)
            served = metric + (compression_shift(self.study, self.compression, self.objectives.index("metric"))
                               if "metric" in self.objectives else 0.0)
            values = [served if o == "metric" else self.cost[o] for o in self.objectives]
            if self.rule.should_stop(self.study, self.trial, rung, values, self.max_steps):
                self.stopped_at = step
                return True
        return False
