"""The Triton container's resource requests and limits, from what loadtest measured at the deployed serving config.

Taken only when loadtest's capacity is (:mod:`deploy.capacity`: the same config, flavour and device kind), from
the loadtest manifest's metrics:

- **CPU**: where no hardware energy counter exists, loadtest meters the serving processes' CPU-seconds and
  reports them as estimated energy (``energy_method`` ``estimated:cpu-s×<W>W``), so ``j_per_request / W`` is the
  CPU-seconds one request costs. The **request** is that × the autoscaler's throughput target per pod
  (capacity ÷ up_factor, :func:`deploy.scaling.targets`): what a pod uses while the HPA (or KEDA) holds it at its
  target, so the scheduler and the scaler plan with the same figure. The cpu overlay's **limit** is the CPU at
  the full measured capacity × ``deploy.resources.cpu_limit_headroom``, never below one core (loading and warming
  the models happens before any request), so a pod surging to capacity before new pods arrive is not throttled;
  the gpu overlay sets no CPU limit, as before. Measured through the gateway (any scenario but ``triton``) the
  figure includes the gateway's processes: an upper bound for Triton, and the annotation says so.
- **Memory**: the peak RSS of Triton's processes (``peak_rss_mib``) × ``deploy.resources.memory_headroom``, as
  request and limit alike: memory cannot be throttled, and a limit above the request lets a node under pressure
  OOM-kill the pod before it reaches its limit.

A figure loadtest did not measure keeps the overlay's default, and the ``autoglm.dev/resources`` annotation names
the command that measures it. A field that is present but unusable is an error naming the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from autoglm.errors import AutoGLMError
from deploy import scaling

# Per overlay, what one Triton pod asks for when nothing was measured. GPU nodes are tainted in most clusters
# (the overlay adds the toleration); there the GPU is the bottleneck and the CPU has no limit.
DEFAULT_RESOURCES = {
    "cpu": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
    "gpu": {"requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}},
}
MEASURE = "autoglm loadtest --scenario triton --sweep"  # measures Triton alone: its CPU-seconds and peak RSS
MIN_CPU_REQUEST_M = 100  # Triton's idle threads (metrics, probes, the stubs' polling) are not in the per-request cost
MIN_CPU_LIMIT_M = 1000  # model loading and warm-up run before the first request: a lower limit slows every start
_ESTIMATED = re.compile(r"^estimated:cpu-s×([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)W$")
_FIX = "re-run `autoglm loadtest --force` to write it again"


@dataclass(frozen=True)
class Usage:
    """What the serving processes used at the deployed config, as loadtest measured it (None: not measured)."""

    cpu_s_per_request: float | None
    peak_rss_mib: float | None
    cpu_basis: str = ""  # where the CPU figure comes from (the energy method, the scenario)
    missing: dict[str, str] = field(default_factory=dict)  # "cpu"/"memory" -> why loadtest gives no figure


@dataclass(frozen=True)
class Resources:
    """The Triton container's ``resources`` and a sentence per figure saying where it comes from."""

    requests: dict[str, str]
    limits: dict[str, str]
    measured: tuple[str, ...]  # "cpu", "memory": the figures taken from loadtest
    source: str

    def spec(self) -> dict[str, dict[str, str]]:
        return {"requests": self.requests, "limits": self.limits}

    def label(self) -> str:
        return "measured" if len(self.measured) == 2 else "partly measured" if self.measured else "default"


def _number(metrics: dict[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a positive finite number; None when absent; AutoGLMError when it is anything else."""
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AutoGLMError(f"the loadtest manifest's {key}={value!r} is not a positive number: {_FIX}")
    return float(value)


def measured_usage(metrics: dict[str, Any]) -> Usage:
    """The CPU-seconds per request and the peak RSS that a loadtest manifest's ``metrics`` record for its
    recommended config (see the module docstring); AutoGLMError naming the fix for a malformed field."""
    missing: dict[str, str] = {}
    cpu_s, basis = None, ""
    method = metrics.get("energy_method")
    j_per_request = _number(metrics, "j_per_request")
    if method is None:
        missing["cpu"] = "loadtest metered no energy, so no CPU-seconds"
    elif not isinstance(method, str):
        raise AutoGLMError(f"the loadtest manifest's energy_method={method!r} is not a method name: {_FIX}")
    elif not method.startswith("estimated"):
        missing["cpu"] = f"loadtest's energy came from a hardware counter ({method}), not from CPU-seconds"
    elif (watts := _ESTIMATED.match(method)) is None or float(watts.group(1)) <= 0:
        raise AutoGLMError(f"the loadtest manifest's energy_method={method!r} is not 'estimated:cpu-s×<W>W': {_FIX}")
    elif j_per_request is None:
        raise AutoGLMError(f"the loadtest manifest has energy_method={method!r} but no j_per_request for its "
                           f"recommended config: {_FIX}")
    else:
        cpu_s = j_per_request / float(watts.group(1))
        scenario = metrics.get("scenario") or "unknown"
        basis = f"the serving processes' CPU-seconds loadtest metered, scenario {scenario}"
        if scenario != "triton":
            basis += f", the gateway's included: an upper bound for Triton (`{MEASURE}` measures it alone)"
    peak = _number(metrics, "peak_rss_mib")
    if peak is None:
        missing["memory"] = "loadtest recorded no peak RSS of Triton's processes"
    return Usage(cpu_s, peak, basis, missing)


def _millicores(cores: float, floor_m: int) -> tuple[str, str]:
    """``cores`` rounded up to millicores, at least ``floor_m``; and a note saying so when the floor applied."""
    milli = math.ceil(round(cores * 1000, 6))
    return (f"{milli}m", "") if milli >= floor_m else (f"{floor_m}m", f" ({milli}m, raised to the floor {floor_m}m)")


def triton_resources(env: str, usage: Usage | None, target_rps_per_pod: float, capacity_rps_per_pod: float,
                     memory_headroom: float, cpu_limit_headroom: float, why_unmeasured: str = "") -> Resources:
    """The Triton container's resources in the ``env`` overlay: the measured figures of ``usage`` at the
    autoscaler's throughput target (``target_rps_per_pod``) and the measured capacity per pod, the overlay's
    defaults for the rest (see the module docstring). ``why_unmeasured``: why there is no ``usage`` at all."""
    requests, limits = dict(DEFAULT_RESOURCES[env]["requests"]), dict(DEFAULT_RESOURCES[env]["limits"])
    measured, lines = [], []
    missing = usage.missing if usage else dict.fromkeys(("cpu", "memory"), why_unmeasured or "not measured")
    if usage and usage.cpu_s_per_request is not None:
        per_request = usage.cpu_s_per_request
        requests["cpu"], floored = _millicores(per_request * target_rps_per_pod, MIN_CPU_REQUEST_M)
        line = (f"cpu request {requests['cpu']} = {per_request * 1000:.3g} ms CPU per request ({usage.cpu_basis}) "
                f"x {target_rps_per_pod:.1f} req/s per pod (the autoscaler's throughput target){floored}")
        if "cpu" in limits:
            limits["cpu"], floored = _millicores(per_request * capacity_rps_per_pod * cpu_limit_headroom,
                                                 MIN_CPU_LIMIT_M)
            line += (f"; limit {limits['cpu']} = the CPU at the capacity {capacity_rps_per_pod:.1f} req/s per pod "
                     f"x {cpu_limit_headroom:g}{floored}")
        measured.append("cpu")
        lines.append(line)
    if usage and usage.peak_rss_mib is not None:
        memory = f"{math.ceil(usage.peak_rss_mib * memory_headroom)}Mi"
        requests["memory"] = limits["memory"] = memory
        measured.append("memory")
        lines.append(f"memory request and limit {memory} = the peak RSS of Triton's processes, "
                     f"{usage.peak_rss_mib:.0f} MiB, x {memory_headroom:g}")
    for what in ("cpu", "memory"):
        if what in missing:
            lines.append(f"{what}: the {env} overlay's default ({missing[what]}; `{MEASURE}` measures it)")
    return Resources(requests, limits, tuple(measured), "; ".join(lines))


def release_resources(release, rules, settings) -> Resources:
    """:func:`triton_resources` for a :class:`deploy.release.Release` under the autoscaling ``rules`` and
    ``settings`` (``deploy``: the env and ``deploy.resources``)."""
    capacity, instances = release.capacity, release.instances_per_pod
    return triton_resources(settings.env, release.usage, scaling.throughput_target(rules, capacity, instances),
                            capacity.per_pod(instances), settings.resources.memory_headroom,
                            settings.resources.cpu_limit_headroom, "no loadtest measured the deployed config")
