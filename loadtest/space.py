"""The serving-knob space of ``loadtest --tune`` and how one trial's step window becomes its result.

Pure functions and one frozen dataclass, no Triton and no locust: the study (:mod:`loadtest.study`)
asks the space for a config, measures it, and hands the window's phases to :func:`trial_result`.

A trial's capacity is measured on a concurrency ladder in one locust window (the step shape:
``users/steps, 2*users/steps, ..., users``, each step reported as its own phase): the best step's
throughput within the SLO, per instance, once steps that noise put out of order are pooled
(:func:`monotone_rps`). That is the sweep's capacity (:mod:`loadtest.front`: the
highest SLO-compliant throughput over the measured concurrencies), from one process start instead of
one per concurrency. J/request, the mean batch and the queue time are over the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from autoglm.config import LoadtestTuneSettings
from autoglm.errors import ConfigError
from loadtest.control import ServingConfig
from loadtest.latency import Slo

NONE = "none"  # the preferred option that prefers the largest batch (Triton's own default)
MISS = 1e6  # a constraint value for a step without requests: infeasible, and worse than any real miss


def encode_preferred(sizes: list[int] | tuple[int, ...], max_batch_size: int | None = None) -> str:
    """A preferred option as a categorical choice: 'none' (no sizes, or just the max batch) or '4,8'."""
    sizes = [int(b) for b in sizes]
    if not sizes or (max_batch_size is not None and sizes == [max_batch_size]):
        return NONE
    return ",".join(map(str, sizes))


def decode_preferred(choice: str, max_batch_size: int) -> tuple[int, ...]:
    """'none' -> (max_batch_size,): Triton turns no preferred sizes into that, so the live check can compare."""
    return (max_batch_size,) if choice == NONE else tuple(int(b) for b in choice.split(","))


@dataclass(frozen=True)
class TuneSpace:
    """Knob ranges as Optuna distributions: a categorical model and preferred option, integer ranges for the
    max batch, the queue delay (on a ``delay_step`` grid) and the instance count."""

    constraint_names: ClassVar[tuple[str, ...]] = ("p95", "error_rate")
    objective_key: ClassVar[str] = "capacity_per_instance_rps"  # what the study maximizes
    energy_key: ClassVar[str] = "j_per_request"  # and minimizes
    unit: ClassVar[str] = "req/s"

    models: tuple[str, ...]
    max_batch_size: tuple[int, int]
    preferred: tuple[str, ...]
    delay: tuple[int, int]
    delay_step: int
    instances: tuple[int, int]

    @classmethod
    def from_settings(cls, tune: LoadtestTuneSettings, models: list[str]) -> TuneSpace:
        if not models:
            raise ConfigError("the tune space has no model: publish a variant (compress) or fix loadtest.tune.variants")
        low, high = tune.max_queue_delay_us
        high = low + (high - low) // tune.delay_step_us * tune.delay_step_us  # Optuna wants whole steps
        preferred = tuple(dict.fromkeys(encode_preferred(sizes) for sizes in tune.preferred_batch_sizes))
        return cls(tuple(dict.fromkeys(models)), tuple(tune.max_batch_size), preferred, (low, high),
                   tune.delay_step_us, tuple(tune.instances))

    def check_model_limits(self, model: str, config: dict[str, Any]) -> None:
        """Refuse ranges ``model`` cannot take, from the config Triton reports for it, naming the fix."""
        if not config.get("max_batch_size"):
            raise ConfigError(f"model '{model}' batches by itself (max_batch_size 0): --tune searches Triton's "
                              "dynamic batching; leave it out of loadtest.tune.variants")
        if config.get("dynamic_batching") is None:
            raise ConfigError(f"model '{model}' has no dynamic batching in its config: enable it in the repository "
                              "(compress writes it) before tuning the batcher")

    def with_baseline(self, params: dict[str, Any]) -> TuneSpace:
        """This space with the baseline's categorical values among the choices: the baseline is a trial like any
        other, and a categorical parameter outside its choices cannot be told to Optuna."""
        models = self.models if params["model"] in self.models else (*self.models, params["model"])
        preferred = self.preferred if params["preferred"] in self.preferred else (*self.preferred, params["preferred"])
        return TuneSpace(models, self.max_batch_size, preferred, self.delay, self.delay_step, self.instances)

    def suggest(self, trial) -> ServingConfig:
        """The config an Optuna trial proposes (fixed parameters of an enqueued trial are used as they are)."""
        model = trial.suggest_categorical("model", list(self.models))
        max_batch = trial.suggest_int("max_batch_size", *self.max_batch_size, log=True)
        preferred = trial.suggest_categorical("preferred", list(self.preferred))
        delay = trial.suggest_int("max_queue_delay_us", *self.delay, step=self.delay_step)
        instances = trial.suggest_int("instances", *self.instances)
        return to_config({"model": model, "max_batch_size": max_batch, "preferred": preferred,
                          "max_queue_delay_us": delay, "instances": instances})

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's space: every categorical choice and instance count, both ends of the other ranges."""
        return {"model": list(self.models), "max_batch_size": sorted(set(self.max_batch_size)),
                "preferred": list(self.preferred), "max_queue_delay_us": sorted(set(self.delay)),
                "instances": list(range(self.instances[0], self.instances[1] + 1))}

    def describe(self) -> dict[str, Any]:
        return {"models": list(self.models), "max_batch_size": list(self.max_batch_size),
                "preferred": list(self.preferred), "max_queue_delay_us": list(self.delay),
                "delay_step_us": self.delay_step, "instances": list(self.instances)}

    @staticmethod
    def to_config(params: dict[str, Any]) -> ServingConfig:
        return to_config(params)

    @staticmethod
    def result(phases: list[dict[str, Any]], slo: Slo, instances: int) -> dict[str, Any]:
        return trial_result(phases, slo, instances)

    @staticmethod
    def steady(result: dict[str, Any], slo: Slo, instances: int) -> dict[str, Any]:
        """A steady (verification) window: the locust gate's verdict and its throughput as the capacity."""
        w = result["window"]
        return {"passed": result["slo"]["passed"], "breaches": result["slo"]["breaches"], "capacity_rps": w["rps"],
                "capacity_per_instance_rps": w["rps"] / instances, "p95_ms": w["p95_ms"],
                "error_rate": w["error_rate"], "requests": w["requests"]}


def to_config(params: dict[str, Any]) -> ServingConfig:
    """Trial parameters -> the serving config applied live (the queue bound stays unbounded: Triton 2.51
    stalls under any bound, see :mod:`loadtest.control`)."""
    return ServingConfig(params["model"], int(params["max_queue_delay_us"]),
                         decode_preferred(params["preferred"], int(params["max_batch_size"])),
                         int(params["instances"]), 0, int(params["max_batch_size"]))


def baseline_params(model: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """The current config (:func:`loadtest.control.serving_knobs` of the model) as trial parameters."""
    return {"model": model, "max_batch_size": knobs["max_batch_size"],
            "preferred": encode_preferred(knobs["preferred_batch_sizes"], knobs["max_batch_size"]),
            "max_queue_delay_us": knobs["max_queue_delay_us"], "instances": knobs["instances"]}


def ladder(users: int, steps: int) -> list[int]:
    """The concurrencies of the step shape (as :mod:`loadtest.locustfiles.shape_step` computes them)."""
    if users < steps:
        raise ConfigError(f"a ladder of {steps} steps needs at least {steps} users (got {users}): raise "
                          "loadtest.tune.users (or loadtest.users) or lower loadtest.tune.steps")
    return [max(1, round(users * (k + 1) / steps)) for k in range(steps)]


def _violation(step: dict[str, Any], slo: Slo) -> list[float]:
    """[p95 / SLO - 1, error rate - allowed]: both <= 0 when the step meets the SLO."""
    if not step.get("requests") or step.get("p95_ms") is None:
        return [MISS, MISS]
    return [step["p95_ms"] / slo.p95_ms - 1.0, (step.get("error_rate") or 0.0) - slo.error_rate]


def monotone_rps(steps: list[dict[str, Any]]) -> list[float]:
    """The steps' throughputs (in ladder order) made non-decreasing in concurrency by pooling neighbours.

    A closed-loop load generator with more users never gets less throughput in expectation, so a step that
    measures less than a lower one is noise: the two are pooled (requests over seconds, the pool-adjacent-
    violators fit) until the ladder rises. On a shared host one lucky short step would otherwise be the trial's
    capacity; pooled, a saturated config's capacity is the mean of its saturated steps, a rising one keeps
    its top step.
    """
    pools: list[list[float]] = []  # [requests, seconds, first index, last index]
    for i, step in enumerate(steps):
        rps, requests = step.get("rps") or 0.0, step.get("requests") or 0
        seconds = step.get("seconds") or (requests / rps if rps > 0 else 0.0)
        pools.append([requests, seconds, i, i])
        while len(pools) > 1 and _rate(pools[-2]) > _rate(pools[-1]):
            last = pools.pop()
            pools[-1] = [pools[-1][0] + last[0], pools[-1][1] + last[1], pools[-1][2], last[3]]
    levels = [0.0] * len(steps)
    for pool in pools:
        for i in range(int(pool[2]), int(pool[3]) + 1):
            levels[i] = _rate(pool)
    return levels


def _rate(pool: list[float]) -> float:
    return pool[0] / pool[1] if pool[1] > 0 else 0.0


def ladder_steps(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step window's ``users=N`` phases, each with its ``users``."""
    steps = []
    for phase in phases:
        label = str(phase.get("phase", ""))
        if label.startswith("users="):
            steps.append({**phase, "users": int(label.partition("=")[2])})
    if not steps:
        raise ValueError("the window has no users=N phases: was it measured with the step shape?")
    return steps


def trial_result(phases: list[dict[str, Any]], slo: Slo, instances: int) -> dict[str, Any]:
    """A trial's capacity from its step window's phases (``users=N`` each).

    Feasible when some step meets the SLO: capacity is the best such step's throughput (per instance) after
    :func:`monotone_rps` pools the steps noise put out of order, and the constraints are that step's (both <= 0). Otherwise capacity is 0 and the constraints are
    those of the step that missed least, so Optuna can tell a near miss from a collapse.
    """
    steps = ladder_steps(phases)
    passing = [s for s in steps if not slo.breaches(s)]
    if passing:
        levels = monotone_rps(passing)
        capacity = max(levels)
        best = passing[len(levels) - 1 - levels[::-1].index(capacity)]  # the pool's top step: its users
    else:
        best = min(steps, key=lambda s: max(_violation(s, slo)))
        capacity = 0.0
    return {"feasible": bool(passing), "capacity_rps": capacity, "capacity_per_instance_rps": capacity / instances,
            "users": best["users"], "p95_ms": best.get("p95_ms"), "error_rate": best.get("error_rate"),
            "constraints": _violation(best, slo),
            "steps": [{k: s.get(k) for k in ("users", "requests", "rps", "p50_ms", "p95_ms", "error_rate")}
                      for s in steps]}
