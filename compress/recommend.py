"""Which published variant compress recommends: tune's choice, unless another published variant beats it on
both axes compress measured.

Among the variants that passed the gates (status ``ok``), one *dominates* another at the serving batch when
its task metric is at least as good, its median latency is not slower beyond measurement noise, and it is
strictly better on one of the two (a better metric, or faster beyond noise). A dominated variant is never
recommended: tune's selected variant (scored in a trial, on other data and another timing run) gives way to
the variant that dominates it, and the recommendation says which and why. Without a preference, the fastest
variant that nothing dominates is recommended.

Noise: each window's own spread gives its median's uncertainty (see :func:`median_noise_ms`); the margin
between two variants is the larger of their combined uncertainty and :data:`LATENCY_TOLERANCE` of the slower
median, because the variants are timed one after another, and drift between two windows on a shared host
(other processes, frequency changes) is in neither window's spread. Latencies within that margin are a tie.
Metrics are compared as measured: every variant is scored on the same validation batches.

A variant without a metric or a latency at that batch cannot dominate or be dominated: it is kept when
preferred, and never chosen as the fastest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from autoglm.errors import AutoGLMError
from compress.variants import Variant

# Latency is compared by the median of each timed window; this much of the slower median is always a tie.
# The variants' windows are taken minutes apart on shared cores, and run-to-run drift of a few percent there
# is in no window's own spread.
LATENCY_TOLERANCE = 0.05
_Z95 = 1.96  # two-sided 95% normal quantile
_MEDIAN_SE = math.sqrt(math.pi / 2)  # standard error of a sample median, in units of sigma / sqrt(n)
_P95_SIGMAS = 1.645  # p95 - p50 of a normal distribution, in sigmas


@dataclass(frozen=True)
class Point:
    """One variant on the two axes the recommendation compares."""

    name: str
    metric: float | None
    p50_ms: float | None
    noise_ms: float = 0.0  # half-width of the median's ~95% interval, from the window's own spread

    @property
    def comparable(self) -> bool:
        return _finite(self.metric) and _finite(self.p50_ms)


@dataclass(frozen=True)
class Recommendation:
    """The recommended variant and the evidence: the batch compared, what it replaced, who dominates whom."""

    variant: str
    why: str
    batch: int | None  # the batch whose latency was compared; None when no variant has one
    replaced: dict[str, Any] | None = None  # {"variant", "source", "by", "why"} when the preference was dominated
    dominated_by: dict[str, list[str]] | None = None  # variant -> the published variants dominating it

    def record(self) -> dict[str, Any]:
        """What variants.json, the manifests and task.json keep of it."""
        return asdict(self) | {"latency": "p50_ms", "tolerance": LATENCY_TOLERANCE}


def median_noise_ms(profile: dict[str, Any]) -> float:
    """~95% half-width of a window's median latency from its own samples: sigma estimated from p95 - p50 (which
    overstates it for the right-skewed latencies of a busy host: a wider margin, never a flip), over sqrt(n)."""
    p50, p95, n = profile.get("p50_ms"), profile.get("p95_ms"), profile.get("n")
    if not (_finite(p50) and _finite(p95) and isinstance(n, int) and n > 0):
        return 0.0
    sigma = max(p95 - p50, 0.0) / _P95_SIGMAS
    return _Z95 * _MEDIAN_SE * sigma / math.sqrt(n)


def latency_margin_ms(a: Point, b: Point) -> float:
    """Latencies of ``a`` and ``b`` closer than this are a tie."""
    return max(LATENCY_TOLERANCE * max(a.p50_ms, b.p50_ms), math.hypot(a.noise_ms, b.noise_ms))


def dominates(a: Point, b: Point, direction: Literal["maximize", "minimize"]) -> bool:
    """Whether ``a`` is no worse than ``b`` on metric and latency (ties within noise) and better on one."""
    if not (a.comparable and b.comparable):
        return False
    sign = 1.0 if direction == "maximize" else -1.0
    if math.isclose(a.metric, b.metric, rel_tol=1e-9, abs_tol=1e-12):
        metric = 0
    else:
        metric = 1 if sign * (a.metric - b.metric) > 0 else -1
    margin = latency_margin_ms(a, b)
    latency = 1 if a.p50_ms < b.p50_ms - margin else -1 if a.p50_ms > b.p50_ms + margin else 0
    return metric >= 0 and latency >= 0 and (metric > 0 or latency > 0)


def compared_batch(variants: Sequence[Variant], serving_batch: int) -> int | None:
    """``serving_batch`` when every variant was timed at it, else the largest batch they were all timed at."""
    timed = [set(v.profile) for v in variants if v.profile]
    common = set.intersection(*timed) if timed else set()
    if not common:
        return None
    return serving_batch if serving_batch in common else max(common)


def points(variants: Sequence[Variant], metric: str, batch: int | None) -> dict[str, Point]:
    """Each variant's metric and median latency at ``batch`` (None where it has none)."""
    out = {}
    for v in variants:
        p = v.profile.get(batch, {}) if batch is not None else {}
        out[v.name] = Point(v.name, v.metrics.get(metric), p.get("p50_ms"), median_noise_ms(p))
    return out


def recommend(task, variants: Sequence[Variant], serving_batch: int, preferred: str | None = None,
              source: str = "tune") -> Recommendation:
    """The variant to serve among ``variants`` that passed their gates (see the module docstring).

    ``task`` gives the metric and its direction; ``preferred`` is the variant ``source`` chose (tune's
    selection), kept unless a published variant dominates it at ``serving_batch``."""
    accepted = [v for v in variants if v.status == "ok"]
    if not accepted:
        raise AutoGLMError("every variant failed its metric gate (see variants.json): raise "
                           "compress.max_metric_loss or add the fp32 variant")
    batch = compared_batch(accepted, serving_batch)
    at = points(accepted, task.metric, batch)
    beaten = {n: [m for m in at if m != n and dominates(at[m], at[n], task.direction)] for n in at}
    dominated_by = {n: by for n, by in beaten.items() if by}
    where = _where(batch, serving_batch)
    if preferred in at:
        chosen = _undominated(preferred, beaten, at)
        if chosen == preferred:
            unknown = "" if at[preferred].comparable else f" (it has no {task.metric} or latency{where}: not compared)"
            return Recommendation(preferred, f"selected by {source} from the Pareto front (see tune/selected.json); "
                                  f"no published variant dominates it{where}{unknown}", batch, None, dominated_by)
        by = beaten[preferred]
        direct = chosen if chosen in by else min(by, key=lambda m: at[m].p50_ms)
        because = (f"{', '.join(by)} {'dominates' if len(by) == 1 else 'dominate'} it{where} "
                   f"({_evidence(task.metric, at[direct], at[preferred])})")
        why = f"{source} selected {preferred}, but {because}; {chosen} is dominated by no published variant"
        replaced = {"variant": preferred, "source": source, "by": chosen, "why": because}
        return Recommendation(chosen, why, batch, replaced, dominated_by)
    unpublished = next((f"{source} selected {preferred}, which is not published ({v.status}: {v.reason}); "
                        for v in variants if v.name == preferred), "")
    front = [n for n in at if at[n].comparable and not beaten[n]]
    if not front:  # nothing was timed: no latency to choose by
        return Recommendation(accepted[0].name, f"{unpublished}the first published variant: none has a latency"
                              f"{where}", batch, None, dominated_by)
    best = min(front, key=lambda n: at[n].p50_ms)
    return Recommendation(best, f"{unpublished}lowest p50 latency{where} ({at[best].p50_ms:.4f} ms) among the "
                          f"variants within compress.max_metric_loss of FP32 {task.metric} that no other one "
                          f"dominates on {task.metric} and latency", batch, None, dominated_by)


def _undominated(name: str, beaten: dict[str, list[str]], at: dict[str, Point]) -> str:
    """``name`` if nothing dominates it, else the fastest of its dominators, followed until one is undominated
    (dominance with a noise margin is acyclic but not transitive)."""
    while beaten[name]:
        fresh = [m for m in beaten[name] if not beaten[m]]
        name = min(fresh or beaten[name], key=lambda m: at[m].p50_ms)
    return name


def _where(batch: int | None, serving_batch: int) -> str:
    if batch is None:
        return ""
    return f" at batch {batch}" if batch == serving_batch else \
        f" at batch {batch} (the largest compress timed; tune.serving_batch={serving_batch} was not timed)"


def _evidence(metric: str, winner: Point, loser: Point) -> str:
    margin = latency_margin_ms(winner, loser)
    return (f"{winner.name}: {metric} {winner.metric:.4f}, p50 {winner.p50_ms:.4f} ms; {loser.name}: {metric} "
            f"{loser.metric:.4f}, p50 {loser.p50_ms:.4f} ms; latencies within {margin:.4f} ms count as a tie")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
