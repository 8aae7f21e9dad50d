"""Autoscaling rules: when to add or remove model instances, shared by the local autoscaler and the cluster.

The defaults are the design's: latency — the average or the p95 — above 200 ms for 30 s → instances
× 1.5 rounded up; utilization below 30% for 5 min → instances ÷ 1.2 rounded down; within
[min_instances, max_instances]; a cooldown after each change. :class:`AutoscaleRules` is plain data:
serve's rules engine applies it to a running Triton, deploy renders it as HPA behavior and targets,
and :func:`rules_from` layers the config's override tables over the defaults.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoglm.errors import ConfigError, validation_problems


class AutoscaleRules(BaseModel):
    """When to add or remove model instances. Times in seconds, latency in milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    latency_ms: float = Field(200.0, gt=0, description="scale up when the average or p95 latency is above this")
    up_after_s: float = Field(30.0, ge=0, description="... continuously for this long")
    up_factor: float = Field(1.5, gt=1, description="instances × this, rounded up")
    utilization_below: float = Field(0.30, gt=0, lt=1, description="scale down when busy below this fraction")
    down_after_s: float = Field(300.0, ge=0, description="... continuously for this long")
    down_factor: float = Field(1.2, gt=1, description="instances ÷ this, rounded down")
    min_instances: int = Field(1, ge=1)
    max_instances: int = Field(4, ge=1)
    up_cooldown_s: float = Field(60.0, ge=0, description="no change for this long after a scale-up")
    down_cooldown_s: float = Field(300.0, ge=0, description="no change for this long after a scale-down")
    interval_s: float = Field(5.0, gt=0, description="how often metrics are sampled and rules evaluated")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleRules:
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances={self.min_instances} is above max_instances={self.max_instances}")
        return self

    def scaled_up(self, n: int) -> int:
        return min(self.max_instances, max(n + 1, math.ceil(n * self.up_factor)))

    def scaled_down(self, n: int) -> int:
        return max(self.min_instances, min(n - 1, math.floor(n / self.down_factor)))


def rules_from(*layers: dict[str, Any], key: str = "serve.autoscale_rules") -> AutoscaleRules:
    """:class:`AutoscaleRules` from override tables (later ones win); a :class:`ConfigError` naming ``key``."""
    try:
        return AutoscaleRules(**{name: value for layer in layers for name, value in layer.items()})
    except ValidationError as exc:
        raise ConfigError(f"{key}: {validation_problems(exc, whole='rules')}; fix: valid keys are "
                          f"{sorted(AutoscaleRules.model_fields)}") from None
