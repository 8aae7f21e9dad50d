"""The generation model's serving knobs for ``loadtest --tune --scenario generate``, and a trial's result in tokens.

The generation model (compress's ``<task>-generate``: KV-cache decoding in Triton's python backend) batches its
own decode steps, so Triton's dynamic batcher has nothing to tune there. What it does read, when it loads, are
its config parameters ``max_sequences`` (decode slots: the sequences stepped together as one batch; more
requests wait for a slot, which a client sees as time to first token), ``stream_interval_ms`` (how long a
stream's tokens are coalesced into one response: every response costs Triton, its HTTP stream and the gateway
CPU) and ``intra_op_spinning`` (whether the decode step's idle ONNX Runtime threads sleep or spin: what it is
worth depends on the model's shape and on what else runs on the cores, so it is measured, not assumed), and,
like any model, its instance count (each instance runs a decode loop of its own). A trial sets them through
model control like the batching knobs (a parameter change reloads the model). The decode precision is not a
knob: compress publishes one generation model, with the graphs it chose.

A stream is judged on what its reader sees: p95 time to first token and p95 inter-token latency
(:class:`StreamSlo`), each step of the concurrency ladder on its own (the locustfile reports both, and the
tokens of the completed streams, per step). Capacity is tokens/s per instance at the best step within that SLO
(steps out of order pooled, as :func:`loadtest.space.monotone_rps` does with requests); energy is J/token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from autoglm.config import LoadtestTuneSettings
from autoglm.errors import ConfigError
from loadtest.control import ServingConfig, model_parameters, serving_knobs
from loadtest.latency import Slo
from loadtest.space import MISS, ladder_steps, monotone_rps

TTFT, ITL = "time to first token", "inter-token"  # the stream metrics' names in the locustfile's summary
SPINNING = "intra_op_spinning"
KNOBS = ("max_sequences", "stream_interval_ms", SPINNING)  # the model parameters searched


@dataclass(frozen=True)
class StreamSlo(Slo):
    """A streaming SLO: p95 time to first token and p95 inter-token latency, and the error rate. ``p95_ms``
    (a whole stream's time, which grows with its length) is not part of it: infinite."""

    ttft_p95_ms: float = math.inf
    itl_p95_ms: float = math.inf

    @classmethod
    def of(cls, ttft_p95_ms: float, itl_p95_ms: float, error_rate: float) -> StreamSlo:
        return cls(math.inf, error_rate, ttft_p95_ms, itl_p95_ms)

    def _p95s(self, summary: dict) -> tuple[float | None, float | None]:
        stream = summary.get("stream") or {}
        return (stream.get(TTFT) or {}).get("p95_ms"), (stream.get(ITL) or {}).get("p95_ms")

    def breaches(self, summary: dict) -> list[str]:
        reasons = super().breaches(summary)
        if not summary.get("requests"):
            return reasons
        for name, p95, limit in zip((TTFT, ITL), self._p95s(summary), (self.ttft_p95_ms, self.itl_p95_ms)):
            if p95 is None:
                reasons.append(f"no {name} measured: no stream completed with tokens")
            elif p95 > limit:
                reasons.append(f"{name} p95 {p95:.2f} ms > SLO {limit:g} ms")
        return reasons

    def violation(self, step: dict[str, Any]) -> list[float]:
        """[TTFT p95 / SLO - 1, inter-token p95 / SLO - 1, error rate - allowed]: each <= 0 within the SLO."""
        if not step.get("requests"):
            return [MISS, MISS, MISS]
        ttft, itl = self._p95s(step)
        return [MISS if ttft is None else ttft / self.ttft_p95_ms - 1.0,
                MISS if itl is None else itl / self.itl_p95_ms - 1.0,
                (step.get("error_rate") or 0.0) - self.error_rate]


def j_per_token(result: dict[str, Any]) -> float | None:
    """A window's energy per generated token (the meter's span charged the tokens of its own span)."""
    energy, window = result.get("energy") or {}, result.get("window") or {}
    rate = window.get("tokens_per_s") or 0.0
    seconds = energy.get("seconds") or window.get("seconds") or 0.0
    if "joules" not in energy or rate <= 0 or seconds <= 0:
        return None
    return energy["joules"] / (rate * seconds)


def _stream_p95(summary: dict[str, Any], name: str) -> float | None:
    return ((summary.get("stream") or {}).get(name) or {}).get("p95_ms")


@dataclass(frozen=True)
class GenerateSpace:
    """The generation model's knobs as Optuna distributions: decode slots (log scale), the stream interval (on
    a ``interval_step`` grid), how the step's idle threads wait (categorical) and the instance count."""

    constraint_names: ClassVar[tuple[str, ...]] = ("ttft_p95", "itl_p95", "error_rate")
    objective_key: ClassVar[str] = "capacity_per_instance_tps"  # what the study maximizes
    energy_key: ClassVar[str] = "j_per_token"  # and minimizes
    unit: ClassVar[str] = "tokens/s"

    model: str
    max_sequences: tuple[int, int]
    interval: tuple[int, int]
    interval_step: int
    instances: tuple[int, int]
    spinning: tuple[str, ...]

    @classmethod
    def from_settings(cls, tune: LoadtestTuneSettings, model: str) -> GenerateSpace:
        low, high = tune.stream_interval_ms
        high = low + (high - low) // tune.stream_interval_step_ms * tune.stream_interval_step_ms  # whole steps
        return cls(model, tuple(tune.max_sequences), (low, high), tune.stream_interval_step_ms, tuple(tune.instances),
                   tuple(dict.fromkeys(tune.intra_op_spinning)))

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model,)

    def check_model_limits(self, model: str, config: dict[str, Any]) -> None:
        """Refuse a model that is not a generation model with these parameters, naming the fix."""
        if not (config.get("model_transaction_policy") or {}).get("decoupled"):
            raise ConfigError(f"model '{model}' does not stream (it is not decoupled): --tune --scenario generate "
                              "tunes the generation model (task.json's 'generate')")
        missing = [k for k in KNOBS if k not in model_parameters(config)]
        if missing:
            raise ConfigError(f"model '{model}' has no {missing} parameters: regenerate the repository with "
                              "`autoglm compress --force`")

    def with_baseline(self, params: dict[str, Any]) -> GenerateSpace:
        """This space with the baseline's spinning mode among the choices (a categorical value outside its choices
        cannot be told to Optuna); a baseline outside the numeric ranges is a fixed trial all the same."""
        if params[SPINNING] in self.spinning:
            return self
        return replace(self, spinning=(*self.spinning, params[SPINNING]))

    def suggest(self, trial) -> ServingConfig:
        """The config an Optuna trial proposes (fixed parameters of an enqueued trial are used as they are)."""
        return self.to_config({
            "max_sequences": trial.suggest_int("max_sequences", *self.max_sequences, log=True),
            "stream_interval_ms": trial.suggest_float("stream_interval_ms", *map(float, self.interval),
                                                      step=float(self.interval_step)),
            SPINNING: trial.suggest_categorical(SPINNING, list(self.spinning)),
            "instances": trial.suggest_int("instances", *self.instances)})

    def to_config(self, params: dict[str, Any]) -> ServingConfig:
        return ServingConfig(self.model, instances=int(params["instances"]), parameters={
            "max_sequences": str(int(params["max_sequences"])),
            "stream_interval_ms": f"{float(params['stream_interval_ms']):g}", SPINNING: str(params[SPINNING])})

    def baseline_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config Triton serves now (HTTP JSON form) as trial parameters."""
        params = model_parameters(config)
        return {"max_sequences": int(params["max_sequences"]), "instances": serving_knobs(config)["instances"],
                "stream_interval_ms": float(params["stream_interval_ms"]), SPINNING: params[SPINNING]}

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's space: both ends of the slot and interval ranges, every spinning mode and instance
        count."""
        return {"max_sequences": sorted(set(self.max_sequences)),
                "stream_interval_ms": sorted({float(v) for v in self.interval}), SPINNING: list(self.spinning),
                "instances": list(range(self.instances[0], self.instances[1] + 1))}

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "max_sequences": list(self.max_sequences),
                "stream_interval_ms": list(self.interval), "stream_interval_step_ms": self.interval_step,
                SPINNING: list(self.spinning), "instances": list(self.instances)}

    def result(self, phases: list[dict[str, Any]], slo: StreamSlo, instances: int) -> dict[str, Any]:
        """A trial's capacity in tokens/s from its step window's phases: the best step within the streaming SLO
        once steps out of order are pooled; otherwise 0, with the constraints of the step that missed least."""
        steps = ladder_steps(phases)
        passing = [s for s in steps if not slo.breaches(s)]
        if passing:
            levels = monotone_rps([{"rps": s.get("tokens_per_s"), "requests": s.get("tokens"),
                                    "seconds": s.get("seconds")} for s in passing])
            capacity = max(levels)
            best = passing[len(levels) - 1 - levels[::-1].index(capacity)]
        else:
            best = min(steps, key=lambda s: max(slo.violation(s)))
            capacity = 0.0
        rps = (best.get("rps") or 0.0) if passing else 0.0
        return {"feasible": bool(passing), "capacity_tps": capacity, "capacity_per_instance_tps": capacity / instances,
                "capacity_rps": rps, "capacity_per_instance_rps": rps / instances, "users": best["users"],
                "p95_ms": best.get("p95_ms"), "ttft_p95_ms": _stream_p95(best, TTFT),
                "itl_p95_ms": _stream_p95(best, ITL), "error_rate": best.get("error_rate"),
                "constraints": slo.violation(best),
                "steps": [{"users": s["users"], "requests": s.get("requests"), "rps": s.get("rps"),
                           "tokens_per_s": s.get("tokens_per_s"), "ttft_p95_ms": _stream_p95(s, TTFT),
                           "itl_p95_ms": _stream_p95(s, ITL), "p95_ms": s.get("p95_ms"),
                           "error_rate": s.get("error_rate")} for s in steps]}

    def steady(self, result: dict[str, Any], slo: StreamSlo, instances: int) -> dict[str, Any]:
        """A steady (verification) window judged on the streaming SLO: its capacity in tokens/s and req/s."""
        w = result["window"]
        summary = {**w, "stream": result.get("stream") or {}}
        breaches = slo.breaches(summary)
        tps = w.get("tokens_per_s") or 0.0
        return {"passed": not breaches, "breaches": breaches, "capacity_rps": w["rps"],
                "capacity_per_instance_rps": w["rps"] / instances, "capacity_tps": tps,
                "capacity_per_instance_tps": tps / instances, "p95_ms": w["p95_ms"],
                "ttft_p95_ms": _stream_p95(summary, TTFT), "itl_p95_ms": _stream_p95(summary, ITL),
                "error_rate": w["error_rate"], "requests": w["requests"]}
