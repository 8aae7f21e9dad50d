"""What tune records on its trials and studies (Optuna user attributes): every name once, with its type.

The objective writes most of them; the stage, the storage, the sampler, the early-stopping rule,
selection, the report and the benchmarks read them. The keys are what studies on disk hold: a key
never changes, so a study written earlier still loads and resumes.

    from tune import attributes as attrs
    attrs.STEPS.set(trial, 400)
    attrs.metric(frozen_trial)  # -> float | None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


@dataclass(frozen=True)
class Attr(Generic[T]):
    """One user attribute: its stored key and the type of its value. ``owner`` is a live or frozen trial,
    or a study (both have ``user_attrs``; live ones ``set_user_attr``)."""

    key: str

    @overload
    def get(self, owner: Any) -> T | None: ...

    @overload
    def get(self, owner: Any, default: T) -> T: ...

    def get(self, owner: Any, default: T | None = None) -> T | None:
        """The recorded value, ``default`` when there is none."""
        return owner.user_attrs.get(self.key, default)

    def on(self, owner: Any) -> bool:
        """Whether ``owner`` records it at all (presence: trial number 0 and False are values too)."""
        return self.key in owner.user_attrs

    def set(self, owner: Any, value: T) -> None:
        owner.set_user_attr(self.key, value)

    def tag(self, value: T) -> dict[str, T]:
        """``{key: value}``: the ``user_attrs`` of a trial queued with ``study.enqueue_trial``."""
        return {self.key: value}


# where a trial runs, recorded as it starts: a journal storage has no heartbeat, so a trial left RUNNING
# is told to be a dead worker's by its host and pid, and the pid by its start time (pids are reused)
HOST: Attr[str] = Attr("host")
PID: Attr[int] = Attr("pid")
STARTED: Attr[float] = Attr("started")  # the worker process's creation time
WORKER: Attr[int] = Attr("worker")  # tune.worker_index: whose share of tune.n_trials the trial counts in

# why a trial failed, or that Ctrl-C or SIGTERM stopped it (the stage retries it on resume)
ERROR: Attr[str] = Attr("error")
INTERRUPTED: Attr[bool] = Attr("interrupted")

# trials the tuner queued rather than the sampler drew
RETRY_OF: Attr[int] = Attr("retry_of")  # the number of the failed or interrupted trial it repeats
WARM_START: Attr[bool] = Attr("warm_start")  # the point tune.warm_start names, queued first
SIBLING_OF: Attr[int] = Attr("sibling_of")  # the trial whose trained model it serves another way
# the index of the tune.portfolio entry it runs: a designed start, judged like a drawn trial (not placed: the
# entries are distinct points, and they stand for the sampler's random start-up rather than come on top of it)
PORTFOLIO: Attr[int] = Attr("portfolio")
PLACED = (WARM_START, SIBLING_OF)
# the one objective the sampler proposed it for (tune.sampler.MetricShare: "metric"); the rungs judge it on that
PROPOSED_FOR: Attr[str] = Attr("proposed_for")

# training
TRAINING_KEY: Attr[str] = Attr("training_key")  # trials with equal keys share one cached checkpoint
CACHE_HIT: Attr[bool] = Attr("cache_hit")  # its model came from the cache: it trained nothing
DDP_PROCS: Attr[int] = Attr("ddp_procs")
HISTORY: Attr[list[tuple[int, float]]] = Attr("history")  # (step, validation metric) at each evaluation
STEPS: Attr[int] = Attr("steps")
STOPPED_AT: Attr[int] = Attr("stopped_at")  # the step at which early stopping ended it
TRAIN_METRIC: Attr[float] = Attr("train_metric")  # of the uncompressed model, at the end of training
FORECAST: Attr[dict[str, float]] = Attr("forecast")  # the learning-curve fit that stopped it (tune.curves)
SCHEDULE_STEPS: Attr[int] = Attr("schedule_steps")  # its max_steps: rungs compare schedules at least as long

# scores
PROBE: Attr[dict[str, float]] = Attr("probe")  # latency and energy of the untrained graph, for early stopping
TIMED: Attr[str] = Attr("timed")  # "untrained" or "trained": which model its timings come from
COMPUTE: Attr[dict[str, Any]] = Attr("compute")  # wall_s, cpu_s, joules, energy_method, device (training)
VARIANT: Attr[dict[str, Any]] = Attr("variant")  # the compressed variant (name, path, metrics, profile, ...)
COMPRESS: Attr[dict[str, Any]] = Attr("compress")  # the compress settings that rebuild it
OBJECTIVES: Attr[dict[str, float]] = Attr("objectives")  # metric, latency, energy


def rung(step: int) -> Attr[list[float]]:
    """The trial's objective values at the early-stopping rung ``step``."""
    return Attr(f"rung_{step}")


# study attribute: the task metric the study's "metric" objective holds (tune.metric resolved)
METRIC_NAME: Attr[str] = Attr("metric_name")
# study attribute: the MLflow parent run its trials are logged under (tune.mlflow_uri; see tune.tracking)
MLFLOW_RUN: Attr[str] = Attr("mlflow_run_id")


def worker_stopped(index: int) -> Attr[bool]:
    """Study attribute: worker ``index``'s optimize has returned (its share may be unfinished)."""
    return Attr(f"worker_{index}_stopped")


def metric(trial: Any) -> float | None:
    """The task metric the trial's served model scored (None before it completes)."""
    return OBJECTIVES.get(trial, {}).get("metric")


def cpu_s(trial: Any) -> float:
    """CPU-seconds the trial cost (0 for one that recorded none)."""
    return COMPUTE.get(trial, {}).get("cpu_s", 0.0)


def placed(trial: Any) -> bool:
    """Whether the tuner queued the trial (a warm start or a compression sibling) rather than the sampler."""
    return any(a.on(trial) for a in PLACED)
