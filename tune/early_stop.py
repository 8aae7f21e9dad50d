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

Options (``tune.early_stop``):

- ``extrapolate``: between rungs too, from the first rung on, a power law fitted to the trial's validation curve
  forecasts its metric at the end of its own schedule (:mod:`tune.curves`); the trial stops when even the
  optimistic end of that forecast, served (compression shift) with its measured latency and energy, is dominated
  by a completed trial. Completed trials are final points whatever their schedule, so no schedule rule is needed
  there; a forecast that is not dominated never stops a trial.
- ``min_resource = "auto"``: the first rung from the budget (:func:`auto_min_resource`); ``first_rung_frac``: no
  earlier than that share of the longest schedule (:func:`tune.objective.with_first_rung`).
- ``portfolio_grace``: a queued portfolio entry passes its first rungs unjudged. An entry is chosen for where it
  ends; a lower learning rate is behind early and crosses the others late, which a rung at a twelfth of the
  schedule cannot see. Its values are recorded at those rungs, so the other trials are judged against it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tune import attributes as attrs
from tune.curves import MIN_POINTS, Forecast, calibration, forecast

MAX_RUNGS = 4  # auto_min_resource's deepest schedule of rungs


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
    extrapolate: bool = False
    portfolio_grace: int = 0  # rungs a portfolio entry passes unjudged (RungCallback)

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

    def survives(self, own: Sequence[float], others: Sequence[Sequence[float]], only: int | None = None) -> bool:
        """Whether a trial with ``own`` values stays, given the other trials' values at the same rung; ``only``:
        ranked on that objective alone (a trial proposed for it, see tune.sampler.MetricShare)."""
        population = [self._minimized(own)] + [self._minimized(o) for o in others]
        if only is not None:
            population = [(p[only],) for p in population]
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

    def should_stop(self, study, trial, rung: int, values: Sequence[float], max_steps: int | None = None,
                    only: int | None = None) -> bool:
        """Record this trial's rung values in the storage and decide against the records of the other trials
        whose schedules are at least ``max_steps`` long (every other trial when None, or when unrecorded);
        ``only``: on that objective alone (:meth:`survives`)."""
        at_rung = attrs.rung(rung)
        if max_steps is not None:
            attrs.SCHEDULE_STEPS.set(trial, max_steps)
        at_rung.set(trial, list(values))
        others = [at_rung.get(t) for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and at_rung.on(t)
                  and (max_steps is None or attrs.SCHEDULE_STEPS.get(t, math.inf) >= max_steps)]
        return not self.survives(values, others, only)

    def forecast_dominated(self, study, trial, history: Sequence[tuple[int, float]], cost: Sequence[float],
                           max_steps: int, shift: float = 0.0, metric_index: int = 0) -> Forecast | None:
        """The forecast of the trial's final metric when even its optimistic end is dominated by a completed trial
        (then the trial should stop; the forecast is recorded on it), else None.

        ``history``: its (step, metric) evaluations so far; ``cost``: its other objectives in study order without
        the metric's slot; ``shift``: the compression shift of its served metric. The optimistic end is moved by
        how far completed trials ended below their own forecasts from the same share of their schedule
        (:func:`tune.curves.calibration`)."""
        import optuna

        if not self.extrapolate or len(history) < MIN_POINTS or history[-1][0] >= max_steps:
            return None
        sign = -1.0 if self.directions[metric_index] == "maximize" else 1.0
        done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.values is not None and t.number != trial.number]
        if not done:
            return None
        ahead = forecast([s for s, _ in history], [sign * v for _, v in history], max_steps)
        if ahead is None:
            return None
        curves = [([(s, sign * v) for s, v in attrs.HISTORY.get(t)], sign * attrs.TRAIN_METRIC.get(t))
                  for t in done if attrs.HISTORY.get(t) and attrs.TRAIN_METRIC.on(t)]
        optimistic = ahead.low + calibration(curves, history[-1][0] / max_steps)
        own = list(cost)
        own.insert(metric_index, sign * optimistic + shift)
        mine = self._minimized(own)
        if not any(dominates(self._minimized(t.values), mine) for t in done):
            return None
        attrs.FORECAST.set(trial, {"step": history[-1][0], "at": max_steps, "predicted": sign * ahead.predicted,
                                   "optimistic": sign * optimistic})
        return ahead


def auto_min_resource(max_steps: int, trials: float, reduction_factor: int, warmup_steps: int = 0) -> int:
    """The first rung that the budget can use: ``max_steps / reduction_factor^k`` steps, ``k`` the number of
    rungs, at least after the learning-rate warm-up.

    ``trials``: how many whole-schedule trials the budget pays for. Successive halving that starts
    ``reduction_factor^k`` trials and keeps ``1/reduction_factor`` at each of ``k`` rungs spends about ``k + 1``
    whole schedules (each rung costs one), so a budget of ``trials`` fills ``k = trials - 1`` rungs and no more:
    a deeper rung would never see the population it needs to stop anything. At least one rung, so early stopping
    does something even on a budget of one or two schedules; at most MAX_RUNGS, Hyperband's usual deepest
    bracket (R = 81 r at a reduction factor of 3): deeper, a rung would judge a curve at 1% of its schedule."""
    rungs = min(MAX_RUNGS, max(1, math.floor(trials) - 1))
    first = max_steps / reduction_factor ** rungs
    while rungs > 1 and first <= warmup_steps:  # a rung inside the warm-up would judge noise
        rungs -= 1
        first = max_steps / reduction_factor ** rungs
    return max(1, math.ceil(max(first, warmup_steps + 1)))


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
        self.history: list[tuple[int, float]] = []  # every evaluation: the curve extrapolation fits

    def __call__(self, step: int, metric: float) -> bool:
        self.history.append((step, metric))
        while self.pending and step >= self.pending[0]:
            rung = self.pending.pop(0)
            values = [metric + self._shift() if o == "metric" else self.cost[o] for o in self.objectives]
            stop = self.rule.should_stop(self.study, self.trial, rung, values, self.max_steps, **self._only())
            if stop and not self._in_grace():
                self.stopped_at = step
                return True
        if self.rule.extrapolate and "metric" in self.objectives and step >= self.rule.min_resource \
                and not self._in_grace():
            cost = [self.cost[o] for o in self.objectives if o != "metric"]
            if self.rule.forecast_dominated(self.study, self.trial, self.history, cost, self.max_steps,
                                            self._shift(), self.objectives.index("metric")) is not None:
                self.stopped_at = step
                return True
        return False

    def _in_grace(self) -> bool:
        """Whether this trial is a portfolio entry still within its unjudged rungs (``rule.portfolio_grace``); its
        values are recorded at those rungs all the same, so the others are judged against it."""
        judged = len(self.rule.rungs(self.max_steps)) - len(self.pending)  # rungs reached, this one included
        return attrs.PORTFOLIO.on(self.trial) and judged <= self.rule.portfolio_grace

    def _only(self) -> dict[str, int]:
        """A trial proposed for one objective is judged on it alone: a trial proposed for the metric, served
        uncompressed, would otherwise be stopped for latency it was never meant to save."""
        wanted = attrs.PROPOSED_FOR.get(self.trial)
        return {"only": self.objectives.index(wanted)} if wanted in self.objectives else {}

    def _shift(self) -> float:
        """The compression loss observed so far for this trial's compression settings (see the module)."""
        if "metric" not in self.objectives:
            return 0.0
        return compression_shift(self.study, self.compression, self.objectives.index("metric"))
