"""The serving objects: Triton and gateway Deployments, Services, PDBs, NetworkPolicy, HPAs.

Plain dicts in Kubernetes' own shape (validated offline against its schemas in the tests). Images are
named by placeholders (``autoglm-gateway``, ``autoglm-models``, the NGC Triton name) that the overlay's
``images:`` pins to the release's tags; resources per environment come from the overlays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from autoglm.gateway_spec import UVICORN_HTTP
from deploy import scaling
from deploy.release import Release

PART_OF = "autoglm"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
GATEWAY_PORT = 8080
# the gateway as serve's supervisor starts it (uvloop, the lean httptools protocol, no access log); the
# gateway image's CMD says the same (tests/deploy/test_images.py holds them together)
GATEWAY_COMMAND = ["uvicorn", "--factory", "serve.gateway.app:app_from_env", "--host", "0.0.0.0",
                   "--port", str(GATEWAY_PORT), "--no-access-log", "--loop", "uvloop", "--http", UVICORN_HTTP]
GATEWAY_GRPC_PORT = 8081  # KServe v2 over gRPC (tritonclient.grpc), served by the same worker processes
TRITON_UID = 1000  # the NGC image's triton-server user
GATEWAY_UID = 10001  # deploy/images/Dockerfile.gateway's user
EXIT_TIMEOUT_S = 30  # Triton drains in-flight requests this long on SIGTERM
GATEWAY_MIN_REPLICAS = 2  # a rolling update or a lost node must not take the entry point away
# our tags name their content (a code or model digest) and NGC's names one release: a cached image with that tag
# is the right one, and pulling on every start would only add a registry outage to the ways a pod fails to start
PULL_POLICY = "IfNotPresent"


@dataclass(frozen=True)
class Cluster:
    """Where things run and who may talk to Triton."""

    namespace: str = "autoglm"
    monitoring_namespace: str = "monitoring"  # where Prometheus (and prometheus-adapter) run
    prometheus_labels: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "prometheus"),)


def selector(component: str) -> dict[str, str]:
    """The labels that select one component's pods (stable across releases: selectors are immutable)."""
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}


def label_value(text: str) -> str:
    """``text`` as a valid label value (at most 63 characters, alphanumeric at both ends)."""
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63]) or "run"


def meta(name: str, component: str, **extra: Any) -> dict[str, Any]:
    """``metadata`` of a component's object."""
    return {"name": name, "labels": selector(component), **extra}


def scrape_annotations(port: int, path: str = "/metrics") -> dict[str, str]:
    """What the Prometheus scrape job (deploy/k8s/monitoring.py) keeps and where it scrapes."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": path}


def _http_probe(path: str, port: str, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "timeoutSeconds": 2,
            "failureThreshold": failures}


def _restricted(uid: int) -> dict[str, Any]:
    """Container security context: non-root, no privilege escalation, no capabilities."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}}


def triton_command() -> list[str]:
    """tritonserver on the native repository the initContainer copied, every model loaded."""
    return ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
            "--strict-readiness=true", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--http-port={PORTS['http']}", f"--grpc-port={PORTS['grpc']}", f"--metrics-port={PORTS['metrics']}",
            "--allow-cpu-metrics=true", "--metrics-config=summary_latencies=true"]  # the p95 the HPA reads


def triton_deployment(release: Release) -> dict[str, Any]:
    """Triton on the native repository, copied from the model image by an initContainer."""
    models_mount = {"name": "models", "mountPath": "/models"}
    annotations = scrape_annotations(PORTS["metrics"]) | {
        "autoglm.dev/models": ",".join(sorted(release.models.values())),
        "autoglm.dev/model-version": str(release.version)}
    pod = {
        "securityContext": {"runAsNonRoot": True, "fsGroup": TRITON_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": EXIT_TIMEOUT_S + 10,
        "initContainers": [{
            "name": "models", "image": "autoglm-models", "imagePullPolicy": PULL_POLICY,
            # the model image holds repository/native at /repository; the emptyDir is Triton's repository
            "command": ["cp", "-R", "/repository/.", "/models/"],
            "volumeMounts": [models_mount], "securityContext": _restricted(TRITON_UID),
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}}],
        "containers": [{
            "name": "triton", "image": TRITON_IMAGE, "imagePullPolicy": PULL_POLICY, "command": triton_command(),
            "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
            "startupProbe": _http_probe("/v2/health/ready", "http", 5, 60),  # model loading: up to 5 min
            "readinessProbe": _http_probe("/v2/health/ready", "http", 5, 3),
            "livenessProbe": _http_probe("/v2/health/live", "http", 10, 3),
            "volumeMounts": [dict(models_mount, readOnly=True), {"name": "shm", "mountPath": "/dev/shm"}],
            "securityContext": _restricted(TRITON_UID)}],
        # /dev/shm: the container runtime's default 64 MB is too small for Triton
        "volumes": [{"name": "models", "emptyDir": {"sizeLimit": "4Gi"}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("autoglm-triton", "triton"),
            "spec": {"selector": {"matchLabels": selector("triton")},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": selector("triton"), "annotations": annotations},
                                  "spec": pod}}}


def gateway_deployment() -> dict[str, Any]:
    """The gateway (uvicorn's factory on the rendered settings JSON), API key hashes from the Secret."""
    container = {
        "name": "gateway", "image": "autoglm-gateway", "imagePullPolicy": PULL_POLICY,
        "command": [*GATEWAY_COMMAND, "--timeout-graceful-shutdown", "20"],
        "env": [{"name": "SERVE_GATEWAY_SETTINGS", "value": "/etc/autoglm/gateway/gateway.json"}],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT},
                  {"name": "grpc", "containerPort": GATEWAY_GRPC_PORT}],
        # HTTP probes cover the gRPC port too: one process serves both, and /readyz also checks Triton's models
        "readinessProbe": _http_probe("/readyz", "http", 5, 3),
        "livenessProbe": _http_probe("/healthz", "http", 10, 3),
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "volumeMounts": [{"name": "settings", "mountPath": "/etc/autoglm/gateway", "readOnly": True},
                         {"name": "task", "mountPath": "/etc/autoglm/repository", "readOnly": True}],
        "securityContext": _restricted(GATEWAY_UID) | {"readOnlyRootFilesystem": True}}
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
           "terminationGracePeriodSeconds": 30, "containers": [container],
           "volumes": [{"name": "settings", "secret": {"secretName": "autoglm-gateway"}},  # API key hashes inside
                       {"name": "task", "configMap": {"name": "autoglm-task"}}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("autoglm-gateway", "gateway"),
            # no replicas field: the HPA owns it, and an apply would otherwise reset its choice
            "spec": {"selector": {"matchLabels": selector("gateway")},
                     "template": {"metadata": {"labels": selector("gateway"),
                                               "annotations": scrape_annotations(GATEWAY_PORT)},
                                  "spec": pod}}}


def services() -> list[dict[str, Any]]:
    """ClusterIP Services: Triton's three ports, the gateway's HTTP and gRPC ones."""
    triton = {"apiVersion": "v1", "kind": "Service", "metadata": meta("autoglm-triton", "triton"),
              "spec": {"selector": selector("triton"),
                       "ports": [{"name": n, "port": p, "targetPort": n} for n, p in PORTS.items()]}}
    gateway = {"apiVersion": "v1", "kind": "Service", "metadata": meta("autoglm-gateway", "gateway"),
               "spec": {"selector": selector("gateway"),
                        "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"},
                                  {"name": "grpc", "port": GATEWAY_GRPC_PORT, "targetPort": "grpc",
                                   "appProtocol": "grpc"}]}}
    return [triton, gateway]


def disruption_budgets() -> list[dict[str, Any]]:
    """At most one Triton and one gateway pod down at a time during voluntary disruptions (drains)."""
    # maxUnavailable rather than minAvailable: a single replica never blocks a node drain forever
    return [{"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(f"autoglm-{c}", c),
             "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(c)}}} for c in ("triton", "gateway")]


def triton_network_policy(cluster: Cluster) -> dict[str, Any]:
    """Triton's inference ports only from the gateway pods; its metrics port only from Prometheus."""
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.monitoring_namespace}},
                  "podSelector": {"matchLabels": dict(cluster.prometheus_labels)}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("autoglm-triton", "triton"),
            "spec": {"podSelector": {"matchLabels": selector("triton")}, "policyTypes": ["Ingress"],
                     "ingress": [
                         {"from": [{"podSelector": {"matchLabels": selector("gateway")}}],
                          "ports": [{"protocol": "TCP", "port": PORTS["http"]},
                                    {"protocol": "TCP", "port": PORTS["grpc"]}]},
                         {"from": [prometheus], "ports": [{"protocol": "TCP", "port": PORTS["metrics"]}]}]}}


def autoscalers(release: Release, rules, keda_prometheus: str | None, namespace: str) -> list[dict[str, Any]]:
    """Triton on its latency and throughput; the gateway on CPU; both at the rules' rates.

    Triton's scaler is an HPA on prometheus-adapter's custom metrics, or with ``keda_prometheus`` (the
    Prometheus URL) a KEDA ScaledObject on the same queries and targets instead: never both on one Deployment.
    """
    behavior = scaling.hpa_behavior(rules)
    annotations = {"autoglm.dev/targets": scaling.targets_note(rules, release.capacity, release.instances_per_pod),
                   "autoglm.dev/capacity-source": "measured" if release.capacity.measured else "default"}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "autoglm-triton"}
    if keda_prometheus:
        triggers = scaling.keda_triggers(rules, release.capacity, release.instances_per_pod, keda_prometheus,
                                         namespace, "autoglm-triton")
        triton = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                  "metadata": meta("autoglm-triton", "triton", annotations=annotations),
                  "spec": {"scaleTargetRef": target, "pollingInterval": max(1, round(rules.interval_s)),
                           "minReplicaCount": rules.min_instances, "maxReplicaCount": rules.max_instances,
                           "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
                           "triggers": triggers}}
    else:
        triton = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                  "metadata": meta("autoglm-triton", "triton", annotations=annotations),
                  "spec": {"scaleTargetRef": target, "minReplicas": rules.min_instances,
                           "maxReplicas": rules.max_instances,
                           "metrics": scaling.hpa_metrics(rules, release.capacity, release.instances_per_pod),
                           "behavior": behavior}}
    cpu = {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    gateway = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": meta("autoglm-gateway", "gateway"),
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "autoglm-gateway"},
                        "minReplicas": GATEWAY_MIN_REPLICAS,
                        "maxReplicas": max(GATEWAY_MIN_REPLICAS, rules.max_instances),
                        "metrics": [cpu], "behavior": behavior}}
    return [triton, gateway]
