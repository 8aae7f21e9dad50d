"""From the study's Pareto front to one release point.

Constraints first (metric within ``max_metric_loss`` of the best, p95 latency under the SLO, energy per
inference under its cap), then weights: each objective is min-max normalized over the candidates and the
weighted sum of badness decides. The choice is written with its reasons, so a reader can check it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from autoglm.config import TuneSettings
from autoglm.errors import AutoGLMError
from tune import attributes as attrs


@dataclass
class Point:
    """One Pareto-optimal trial: its objectives and where its artifacts are (relative to tune/)."""

    trial: int
    objectives: dict[str, float]
    params: dict[str, Any]
    checkpoint: str
    compress: dict[str, Any]
    variant: str
    compute: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pareto_points(study) -> list[Point]:
    """The study's completed Pareto-optimal trials."""
    points = []
    for t in study.best_trials:
        points.append(Point(t.number, dict(attrs.OBJECTIVES.get(t)), dict(t.params), f"trials/{t.number:04d}/model.pt",
                            attrs.COMPRESS.get(t), attrs.VARIANT.get(t)["name"], attrs.COMPUTE.get(t, {})))
    return sorted(points, key=lambda p: p.trial)


def select(points: list[Point], settings: TuneSettings, metric_direction: str) -> tuple[Point, dict[str, Any]]:
    """(chosen point, why): constraints, then the weighted normalized score."""
    if not points:
        raise AutoGLMError("no trial completed, so there is nothing to select: raise tune.n_trials or "
                           "tune.timeout_s, or loosen early stopping (tune.early_stop.enabled = false)")
    sign = -1.0 if metric_direction == "maximize" else 1.0  # badness: lower is better for every objective
    best_metric = min(sign * p.objectives["metric"] for p in points) * sign
    rejected: dict[int, str] = {}
    for p in points:
        loss = sign * (p.objectives["metric"] - best_metric) / max(abs(best_metric), 1e-12)
        if loss > settings.max_metric_loss:
            rejected[p.trial] = f"metric {loss:.2%} worse than the best (limit {settings.max_metric_loss:.2%})"
        elif settings.latency_slo_ms and p.objectives.get("latency", 0) > settings.latency_slo_ms:
            rejected[p.trial] = f"p95 {p.objectives['latency']:.3f} ms over the SLO {settings.latency_slo_ms} ms"
        elif settings.max_joules and p.objectives.get("energy", 0) > settings.max_joules:
            rejected[p.trial] = f"{p.objectives['energy']:.3g} J/inference over the cap {settings.max_joules}"
    candidates = [p for p in points if p.trial not in rejected]
    if not candidates:
        raise AutoGLMError("no Pareto-optimal trial meets the selection constraints "
                           f"({'; '.join(f'trial {k}: {v}' for k, v in rejected.items())}): relax "
                           "tune.max_metric_loss, tune.latency_slo_ms or tune.max_joules")
    scores = _scores(candidates, {k: w for k, w in settings.weights.items() if k in settings.objectives}, sign)
    chosen = min(candidates, key=lambda p: (scores[p.trial], p.trial))
    why = {"rule": "constraints, then the lowest weighted sum of min-max normalized objectives",
           "weights": settings.weights, "scores": scores, "rejected": rejected, "best_metric": best_metric}
    return chosen, why


def _scores(points: list[Point], weights: dict[str, float], sign: float) -> dict[int, float]:
    names = [n for n in points[0].objectives if weights.get(n, 0) > 0]
    scores = {p.trial: 0.0 for p in points}
    for name in names:
        bad = {p.trial: (sign if name == "metric" else 1.0) * p.objectives[name] for p in points}
        low, high = min(bad.values()), max(bad.values())
        for trial, value in bad.items():
            scores[trial] += weights[name] * ((value - low) / (high - low) if high > low else 0.0)
    return scores
