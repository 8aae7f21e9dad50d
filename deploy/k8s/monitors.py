"""Prometheus Operator monitors: a ServiceMonitor for the gateway, a PodMonitor for Triton.

The Operator ignores the ``prometheus.io/*`` annotations the plain scrape job keeps (``monitoring/``);
these select the same targets and relabel them alike (``namespace``, ``pod``, ``component``), so the
HPA's prometheus-adapter rules, KEDA's queries and the dashboard read the same series either way. Use
one of the two, not both: a target scraped twice doubles every sum. Triton is watched per pod (the
autoscaling metrics are per pod); the gateway through its Service, whose endpoints are its pods.
"""

from __future__ import annotations

from typing import Any

from deploy.k8s.serving import meta, selector

API = "monitoring.coreos.com/v1"
SCRAPE_INTERVAL = "15s"  # the scrape job's: Triton's rate() windows of 1m need several samples


def _relabelings() -> list[dict[str, Any]]:
    """The scrape job's labels (the Operator adds ``namespace`` and ``pod`` itself)."""
    return [{"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "targetLabel": "component",
             "action": "replace"}]


def _with_labels(obj: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    obj["metadata"]["labels"] = {**labels, **obj["metadata"]["labels"]}  # our own selector labels win
    return obj


def monitors(labels: dict[str, str], metrics_port: str, gateway_port: str) -> list[dict[str, Any]]:
    """The gateway's ServiceMonitor and Triton's PodMonitor, carrying ``labels`` for Prometheus' selectors."""
    endpoint = {"path": "/metrics", "interval": SCRAPE_INTERVAL, "scheme": "http", "relabelings": _relabelings()}
    gateway = {"apiVersion": API, "kind": "ServiceMonitor", "metadata": meta("autoglm-gateway", "gateway"),
               "spec": {"selector": {"matchLabels": selector("gateway")},
                        "endpoints": [{"port": gateway_port, **endpoint}]}}
    triton = {"apiVersion": API, "kind": "PodMonitor", "metadata": meta("autoglm-triton", "triton"),
              "spec": {"selector": {"matchLabels": selector("triton")},
                       "podMetricsEndpoints": [{"port": metrics_port, **endpoint}]}}
    return [_with_labels(gateway, labels), _with_labels(triton, labels)]
