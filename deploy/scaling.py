"""The local autoscaling rules, rendered for Kubernetes: HPA behavior, targets, prometheus-adapter rules.

The rules are ``autoglm.autoscaling.AutoscaleRules`` (latency above 200 ms for 30 s → instances × 1.5
rounded up; utilization below 30% for 5 min → ÷ 1.2 rounded down; min/max; cooldowns). An HPA is
target tracking, so they map like this:

- scale-up **rate**: policies ``Percent (factor-1)·100`` and ``Pods 1`` per ``max(window, cooldown)``
  seconds, ``selectPolicy: Max``; the HPA rounds a Percent scale-up *up*, exactly like the rule;
- scale-up **condition** "for 30 s": ``stabilizationWindowSeconds`` (the HPA acts on the lowest
  recommendation of the window, so the metric must stay high for all of it);
- scale-down **rate**: the HPA *truncates* a Percent scale-down (``int(n·(1-p/100))``), so ``p`` is
  ``floor(100·(1-1/factor))`` (16 for ÷1.2): it never removes more than the rule, and matches it for
  every replica count up to ~25; ``Pods 1`` makes 2 → 1 possible as in the rule;
- scale-down **condition** "for 5 min": ``stabilizationWindowSeconds`` 300 (highest recommendation);
- **targets**: the rule's latency threshold for Triton's average and p95 request latency (either one
  above it scales up: the rule's "average or p95"), and requests/s per pod at ``capacity / factor`` so
  a sudden ×factor surge still fits while the HPA adds ×factor pods. The utilization floor has no HPA
  equivalent: below the targets the HPA scales down, at the rule's rate and after the rule's window.

KEDA (``deploy.autoscaler = "keda"``) gets the same three targets as Prometheus triggers of
``metricType: AverageValue``: each query sums the per-pod series over Triton's pods and KEDA's HPA
divides by the threshold, ``ceil(sum / target)`` replicas, which is what a Pods metric asks for
(``ceil(pods · average / target)``); its ``advanced.horizontalPodAutoscalerConfig.behavior`` is the HPA's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deploy.capacity import Capacity

HPA_MAX_PERIOD_S = 1800  # the API's limits for periodSeconds and stabilizationWindowSeconds
HPA_MAX_WINDOW_S = 3600


@dataclass(frozen=True)
class Series:
    """One prometheus-adapter rule: a per-pod custom metric computed from Triton's counters."""

    name: str  # the custom metric the HPA asks for
    source: str  # the Triton series that must exist on a pod for the metric to exist
    query: str  # PromQL with the adapter's <<.LabelMatchers>> and <<.GroupBy>> placeholders
    help: str

    def promql(self, matchers: str, group_by: str = "pod") -> str:
        """The query as the adapter sends it to Prometheus for ``matchers`` (e.g. ``namespace="a",pod=~"x"``)."""
        return self.query.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)


def _rate(metric: str) -> str:
    return f"sum by (<<.GroupBy>>) (rate({metric}{{<<.LabelMatchers>>}}[1m]))"


# Triton counts durations in microseconds and cumulatively; per pod, all models together.
LATENCY = Series("autoglm_triton_request_latency_seconds", "nv_inference_request_duration_us",
                 f"({_rate('nv_inference_request_duration_us')} / clamp_min({_rate('nv_inference_request_success')}"
                 ", 1e-9)) / 1e6",
                 "average request latency (queue + compute), the rule's 'average latency'")
P95 = Series("autoglm_triton_request_p95_seconds", "nv_inference_request_summary_us",
             'max by (<<.GroupBy>>) (nv_inference_request_summary_us{<<.LabelMatchers>>,quantile="0.95"}) / 1e6',
             "p95 request latency over Triton's summary window (needs --metrics-config=summary_latencies=true)")
THROUGHPUT = Series("autoglm_triton_requests_per_second", "nv_inference_request_success",
                    _rate("nv_inference_request_success"), "successful inference requests per second")
SERIES = (LATENCY, P95, THROUGHPUT)
# the generation model's own counter (compress/triton_generate_model.py): a target only where a verified :generate
# capacity sizes the run's generation model (deploy.capacity.generation_capacity)
TOKENS = Series("autoglm_generate_tokens_per_second", "autoglm_generate_tokens_total",
                _rate("autoglm_generate_tokens_total"), "tokens per second the generation model streams")


def _policy(kind: str, value: int, period_s: float) -> dict[str, Any]:
    return {"type": kind, "value": int(value), "periodSeconds": int(min(HPA_MAX_PERIOD_S, max(1, period_s)))}


def hpa_behavior(rules) -> dict[str, Any]:
    """``spec.behavior`` of an autoscaling/v2 HPA from the rule object (see the module docstring)."""
    up_pct = math.ceil(round((rules.up_factor - 1) * 100, 6))
    down_pct = math.floor(round(100 * (1 - 1 / rules.down_factor), 6))
    up_period = max(rules.up_after_s, rules.up_cooldown_s)  # the engine needs both before its next change
    down_period = max(rules.down_after_s, rules.down_cooldown_s)
    return {
        "scaleUp": {"stabilizationWindowSeconds": int(min(HPA_MAX_WINDOW_S, rules.up_after_s)),
                    "selectPolicy": "Max",
                    "policies": [_policy("Percent", up_pct, up_period), _policy("Pods", 1, up_period)]},
        "scaleDown": {"stabilizationWindowSeconds": int(min(HPA_MAX_WINDOW_S, rules.down_after_s)),
                      "selectPolicy": "Max",
                      "policies": [_policy("Percent", down_pct, down_period), _policy("Pods", 1, down_period)]},
    }


def hpa_limit(replicas: int, rules: dict[str, Any], up: bool) -> int:
    """The replica count the HPA allows after one period (kube-controller-manager's arithmetic).

    Scale-up: ``ceil(n·(1+p/100))`` or ``n+value``; scale-down: ``int(n·(1-p/100))`` or ``n-value``;
    ``selectPolicy: Max`` takes the largest change. Used to check the behavior against the rules.
    """
    proposals = []
    for policy in rules["policies"]:
        if policy["type"] == "Pods":
            proposals.append(replicas + policy["value"] if up else replicas - policy["value"])
        elif up:
            proposals.append(math.ceil(replicas * (1 + policy["value"] / 100)))
        else:
            proposals.append(int(replicas * (1 - policy["value"] / 100)))
    largest = max if up else min
    return largest(proposals) if rules.get("selectPolicy", "Max") == "Max" else (min if up else max)(proposals)


def quantity(value: float) -> str:
    """A Kubernetes quantity in milli-units (0.2 → "200m"), exact for the targets used here."""
    return f"{max(1, round(value * 1000))}m"


def threshold(value: float) -> str:
    """:func:`quantity`'s value as the decimal a KEDA trigger takes (0.2 → "0.2", 66.6666 → "66.667")."""
    return f"{max(1, round(value * 1000)) / 1000:g}"


def hpa_metrics(rules, capacity: Capacity, instances_per_pod: int) -> list[dict[str, Any]]:
    """The HPA's Pods metrics with their targets (see the module docstring)."""

    def pods(series: Series, target: float) -> dict[str, Any]:
        return {"type": "Pods", "pods": {"metric": {"name": series.name},
                                         "target": {"type": "AverageValue", "averageValue": quantity(target)}}}

    return [pods(series, target) for series, target in targets(rules, capacity, instances_per_pod)]


def throughput_target(rules, capacity: Capacity, instances_per_pod: int) -> float:
    """Requests/s per pod the autoscaler holds a pod at: capacity / up_factor (see the module docstring); the
    Triton container's CPU request is sized for this load (:mod:`deploy.resources`)."""
    return capacity.per_pod(instances_per_pod) / rules.up_factor


def targets(rules, capacity: Capacity, instances_per_pod: int) -> list[tuple[Series, float]]:
    """Each series with its per-pod target (see the module docstring)."""
    latency_s = rules.latency_ms / 1000
    out = [(LATENCY, latency_s), (P95, latency_s), (THROUGHPUT, throughput_target(rules, capacity, instances_per_pod))]
    if capacity.generation is not None and capacity.generation.measured:  # tokens/s per pod at capacity / up_factor
        out.append((TOKENS, capacity.generation.per_pod() / rules.up_factor))
    return out


def keda_triggers(rules, capacity: Capacity, instances_per_pod: int, server: str, namespace: str,
                  pod_prefix: str) -> list[dict[str, Any]]:
    """A KEDA ScaledObject's Prometheus triggers: the HPA's metrics and targets, queried from Prometheus directly."""
    matchers = f'namespace="{namespace}",pod=~"{pod_prefix}-.+"'
    return [{"type": "prometheus", "name": series.name.removeprefix("autoglm_").replace("_", "-"),
             "metricType": "AverageValue",
             "metadata": {"serverAddress": server, "query": f"sum({series.promql(matchers)})",
                          "threshold": threshold(target)}}
            for series, target in targets(rules, capacity, instances_per_pod)]


def targets_note(rules, capacity: Capacity, instances_per_pod: int) -> str:
    """One line for the rendered files: where each target comes from."""
    rps = throughput_target(rules, capacity, instances_per_pod)
    note = (f"latency targets {rules.latency_ms:g} ms (autoscaling rule); throughput target {rps:.1f} req/s per pod "
            f"= capacity / {rules.up_factor:g} with capacity {capacity.source}")
    generation = capacity.generation
    if generation is None:
        return note
    if not generation.measured:
        return f"{note}; {generation.model}: {generation.source}"
    return (f"{note}; {generation.model}: token target {generation.per_pod() / rules.up_factor:.0f} tokens/s per pod "
            f"= capacity x {generation.instances_per_pod} instance(s) / {rules.up_factor:g}, capacity "
            f"{generation.source}")


def adapter_config(generation: bool = False) -> dict[str, Any]:
    """prometheus-adapter's ``rules:`` for the custom metrics the HPA uses (pods labelled by the scrape job); the
    generation model's tokens/s too where its capacity sets a target (``generation``)."""
    return {"rules": [{
        "seriesQuery": f'{s.source}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{s.source}$", "as": s.name},
        "metricsQuery": s.query,
    } for s in (*SERIES, TOKENS) if s is not TOKENS or generation]}
