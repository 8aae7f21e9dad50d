"""Kustomize trees for Kubernetes: ``base`` + the ``cpu``/``gpu`` overlay, monitoring, tune workers.

:func:`serving_tree` and :func:`tune_tree` return ``{relative path: content}``; content is a list of
objects (a multi-document YAML file), one object, or raw bytes. Layout under ``deploy/out/<env>/k8s``::

    kustomization.yaml       everything below: `kubectl apply -k` this directory
    base/                    Triton, gateway, Services, PDBs, NetworkPolicy, HPAs (or Triton's KEDA
                             ScaledObject), task.json, gateway.json; monitors.yaml (ServiceMonitor,
                             PodMonitor) and ingress.yaml (Ingress, or Gateway + HTTPRoute) when asked for
    overlays/<env>/          namespace, image tags of the release, Triton's resources (measured, else per env)
    monitoring/              prometheus-adapter rules (custom metrics for the HPA) + Prometheus scrape job
    tune/                    only with --tune-workers: Indexed Job, PostgreSQL, the shared runs volume
"""

from __future__ import annotations

import json
from typing import Any

from autoglm._lazy import require
from deploy import scaling
from deploy.k8s import ingress, monitors, serving, tune
from deploy.k8s.serving import Cluster
from deploy.release import Images, Release
from deploy.resources import Resources

ENVS = ("cpu", "gpu")
Tree = dict[str, Any]

def _image_pins(images: Images, *placeholders: str) -> list[dict[str, str]]:
    """kustomize ``images:`` entries pinning each placeholder image name to the release's tag."""
    references = {"autoglm-gateway": images.gateway, "autoglm-models": images.models,
                  serving.TRITON_IMAGE: images.triton, "autoglm-tune": images.tune}
    pins = []
    for placeholder in placeholders:
        name, _, tag = references[placeholder].rpartition(":")
        pins.append({"name": placeholder, "newName": name, "newTag": tag})
    return pins


def yaml_text(content: Any) -> str:
    """One object or a list of objects as (multi-document) YAML, keys in the order written."""
    docs = content if isinstance(content, list) else [content]
    yaml = require("yaml", purpose="rendering Kubernetes manifests")
    return yaml.safe_dump_all(docs, sort_keys=False, width=120)


def _kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def triton_patch(env: str, resources: Resources) -> dict[str, Any]:
    """Strategic-merge patch of the Triton Deployment for ``env``: its container's ``resources`` (measured or the
    overlay's defaults, the annotation says which and how), the GPU nodes' toleration."""
    container = {"name": "triton", "resources": resources.spec()}
    spec: dict[str, Any] = {"containers": [container]}
    if env == "gpu":  # GPU nodes are tainted in most clusters
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    annotations = {"autoglm.dev/resources": resources.source, "autoglm.dev/resources-source": resources.label()}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "autoglm-triton",
                                                                         "annotations": annotations},
            "spec": {"template": {"spec": spec}}}


def scrape_config(namespace: str) -> dict[str, Any]:
    """A Prometheus ``scrape_configs`` job for the annotated pods, labelling series by namespace and pod
    (the labels prometheus-adapter maps back to Kubernetes objects)."""
    meta = "__meta_kubernetes_pod_"
    return {"scrape_configs": [{
        "job_name": "autoglm", "scrape_interval": "15s",
        "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [namespace]}}],
        "relabel_configs": [
            {"source_labels": [f"{meta}annotation_prometheus_io_scrape"], "action": "keep", "regex": "true"},
            {"source_labels": [f"{meta}annotation_prometheus_io_path"], "action": "replace",
             "target_label": "__metrics_path__", "regex": "(.+)"},
            {"source_labels": ["__address__", f"{meta}annotation_prometheus_io_port"], "action": "replace",
             "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2", "target_label": "__address__"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": [f"{meta}name"], "target_label": "pod"},
            {"source_labels": [f"{meta}label_app_kubernetes_io_name"], "target_label": "component"}]}]}


def keda_server(options) -> str:
    """The Prometheus KEDA queries: ``deploy.prometheus_url``, else the Prometheus Operator's Service."""
    return options.prometheus_url or f"http://prometheus-operated.{options.monitoring_namespace}.svc:9090"


def serving_tree(release: Release, images: Images, rules, cluster: Cluster, gateway_json: bytes, options,
                 resources: Resources) -> Tree:
    """The serving stack as a kustomize tree (see the module docstring); ``options`` is ``deploy``
    (:class:`autoglm.config.DeploySettings`: env, scaler, monitors, ingress); ``resources``: the Triton
    container's (:func:`deploy.resources.release_resources`)."""
    env = options.env
    keda = keda_server(options) if options.autoscaler == "keda" else None
    base = [serving.triton_deployment(release), serving.gateway_deployment(), *serving.services(),
            *serving.disruption_budgets(), serving.triton_network_policy(cluster),
            *serving.autoscalers(release, rules, keda, cluster.namespace)]
    extra: Tree = {}
    if options.monitors:
        extra["base/monitors.yaml"] = monitors.monitors(options.monitor_labels, "metrics", "http")
    if options.ingress.host:
        extra["base/ingress.yaml"] = ingress.entry(options.ingress)
    labels = {"app.kubernetes.io/instance": serving.label_value(release.run), "autoglm.dev/env": env}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cluster.namespace}}
    return {
        "kustomization.yaml": _kustomization(resources=[f"overlays/{env}", "monitoring"]),
        "base/kustomization.yaml": _kustomization(
            resources=["serving.yaml", *(path.removeprefix("base/") for path in extra)],
            configMapGenerator=[{"name": "autoglm-task", "files": ["task.json"]}],
            secretGenerator=[{"name": "autoglm-gateway", "files": ["gateway.json"]}]),
        "base/serving.yaml": base,
        **extra,
        "base/task.json": release.task_json,
        "base/gateway.json": gateway_json,
        f"overlays/{env}/kustomization.yaml": _kustomization(
            namespace=cluster.namespace, resources=["../../base", "namespace.yaml"],
            labels=[{"pairs": labels, "includeSelectors": False, "includeTemplates": True}],
            images=_image_pins(images, "autoglm-gateway", "autoglm-models", serving.TRITON_IMAGE),
            patches=[{"path": "triton.yaml"}]),
        f"overlays/{env}/namespace.yaml": namespace,
        f"overlays/{env}/triton.yaml": triton_patch(env, resources),
        "monitoring/kustomization.yaml": _kustomization(
            namespace=cluster.monitoring_namespace,
            # a fixed name: prometheus-adapter's own Deployment (not in this tree) mounts it
            configMapGenerator=[{"name": "autoglm-adapter-rules", "files": ["config.yaml=adapter-rules.yaml"],
                                 "options": {"disableNameSuffixHash": True}}]),
        "monitoring/adapter-rules.yaml": scaling.adapter_config(
            bool(release.capacity.generation and release.capacity.generation.measured)),
        "monitoring/prometheus-scrape.yaml": scrape_config(cluster.namespace),
    }


def tune_tree(release: Release, images: Images, cluster: Cluster, workers: int, n_trials: int,
              in_cluster_db: bool) -> Tree:
    """The tune workers' tree (``k8s/tune``): applied on its own, when a study should run."""
    objects = [tune.runs_volume(), tune.tune_job(release.run, workers, n_trials, in_cluster_db)]
    if in_cluster_db:
        objects += tune.postgres()
    config = json.dumps(tune.worker_config(release.run_config), indent=2, sort_keys=True).encode() + b"\n"
    return {
        "tune/kustomization.yaml": _kustomization(
            namespace=cluster.namespace, resources=["tune.yaml"], images=_image_pins(images, "autoglm-tune"),
            labels=[{"pairs": {"app.kubernetes.io/instance": serving.label_value(release.run)},
                     "includeSelectors": False, "includeTemplates": True}],
            configMapGenerator=[{"name": "autoglm-tune-config", "files": ["config.json"]}]),
        "tune/tune.yaml": f"# {tune_comment(workers, n_trials)}\n# {tune.SECRET_HINT}\n{yaml_text(objects)}",
        "tune/config.json": config,
    }


def tune_comment(workers: int, n_trials: int) -> str:
    """How the trials split, for the rendered Job's header (honest about what tune supports today)."""
    if tune.tune_supports_workers():
        return f"{workers} workers share tune.n_trials={n_trials}: worker i runs its share of the study"
    return (f"tune has no tune.workers yet: each of the {workers} workers runs tune.n_trials={n_trials} trials of its "
            f"own, so the study gets {workers * n_trials}")
