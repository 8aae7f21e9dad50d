"""Distributed tuning on Kubernetes: N tune workers (an Indexed Job) on one Optuna study in PostgreSQL.

Every worker runs ``python -m tune`` on the same run directory, a ReadWriteMany volume: trial
directories (``tune/trials/<n>``) and the trained-checkpoint cache are shared, so the worker that
selects the release finds every trial's checkpoint. The database is a PostgreSQL StatefulSet, or an
external one: either way its URL comes from the Secret ``autoglm-tune-db`` (key ``url``; the
StatefulSet also reads ``password``), which is created by hand and never rendered::

    kubectl -n autoglm create secret generic autoglm-tune-db --from-literal=password=<pw> \\
        --from-literal=url=postgresql+psycopg2://autoglm:<pw>@autoglm-postgres:5432/autoglm

Heartbeats and the retry of trials whose worker died come with the RDB storage (tune/storage.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.k8s.serving import GATEWAY_UID, PULL_POLICY, meta, selector

DB_SECRET = "autoglm-tune-db"
POSTGRES_IMAGE = "postgres:15"  # the server version the tests run against (Debian's postgresql 15)
POSTGRES_UID = 999  # the official image's postgres user
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# a worker pod that fails is replaced this often; this also absorbs Optuna's schema-creation race on a fresh
# database (two workers creating the same tables at once: one fails with a unique violation, its retry succeeds)
BACKOFF_LIMIT_PER_INDEX = 2


SECRET_HINT = (f"create the database Secret first (never rendered): kubectl -n <namespace> create secret generic "
               f"{DB_SECRET} --from-literal=password=<pw> --from-literal=url=postgresql+psycopg2://autoglm:<pw>@"
               "autoglm-postgres:5432/autoglm (with --external-db: only url, pointing at your database)")


def tune_supports_workers() -> bool:
    """True once tune splits ``tune.n_trials`` between workers (``tune.workers`` / ``tune.worker_index``)."""
    from autoglm.config import TuneSettings

    return {"workers", "worker_index"} <= set(TuneSettings.model_fields)


def _env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def worker_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config with the paths and storage of a worker pod (the shared volume, the Secret).

    No path of the machine that rendered it goes in: a data file is read from the volume's ``data/``
    (:func:`worker_data`), and files tune never reads (a checkpoint to compress, key files) are dropped."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in run_config.items()}
    config["run"] = {**config.get("run", {}), "root": "/srv/autoglm/runs", "cache_dir": "/srv/autoglm/runs/.cache"}
    config["tune"] = {**config.get("tune", {}), "storage": None}  # AUTOGLM_TUNE__STORAGE, from the Secret
    if config.get("task", {}).get("data"):
        config["task"] = {**config["task"], "data": worker_data(config["task"]["data"])}
    if "compress" in config:
        config["compress"] = {**config["compress"], "checkpoint": None}
    if "serve" in config:
        config["serve"] = {**config["serve"], "gateway": {**config["serve"].get("gateway", {}), "api_keys_file": None}}
    if "deploy" in config:
        config["deploy"] = {**config["deploy"], "api_keys_file": None}
    return config


def worker_data(path: str) -> str:
    """Where a worker pod reads the run's data file: the shared volume's ``data/``, same file name."""
    return f"/srv/autoglm/runs/data/{Path(path).name}"


def worker_env(workers: int) -> list[dict[str, Any]]:
    """Settings every worker gets through AUTOGLM_* variables (above the config file, below flags)."""
    env = [{"name": "AUTOGLM_TUNE__STORAGE", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "url"}}},
           _env("OMP_WAIT_POLICY", "PASSIVE")]
    if tune_supports_workers():
        env += [_env("AUTOGLM_TUNE__WORKERS", str(workers)),
                {"name": "AUTOGLM_TUNE__WORKER_INDEX", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}}]
    return env


def worker_command(run: str, n_trials: int) -> list[str]:
    """What every worker runs: the ordinary tune stage, on the shared run."""
    return ["python", "-m", "tune", "--config", "/etc/autoglm/tune/config.json", "--run", run,
            "--trials", str(n_trials)]


def tune_job(run: str, workers: int, n_trials: int, in_cluster_db: bool) -> dict[str, Any]:
    """The Indexed Job: ``workers`` pods at once, each replaced on failure on its own (backoffLimitPerIndex)."""
    container = {
        "name": "tune", "image": "autoglm-tune", "imagePullPolicy": PULL_POLICY, "workingDir": "/srv/autoglm",
        "command": worker_command(run, n_trials),
        "env": worker_env(workers),
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        "volumeMounts": [{"name": "runs", "mountPath": "/srv/autoglm/runs"},
                         {"name": "config", "mountPath": "/etc/autoglm/tune", "readOnly": True}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": GATEWAY_UID, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}}}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # backoffLimitPerIndex needs it: a failed worker is retried as a new pod
        "securityContext": {"runAsNonRoot": True, "fsGroup": GATEWAY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "autoglm-runs"}},
                    {"name": "config", "configMap": {"name": "autoglm-tune-config"}}]}
    if in_cluster_db:  # start only once the database answers, instead of spending retries on it
        pod["initContainers"] = [{
            "name": "wait-for-db", "image": POSTGRES_IMAGE, "imagePullPolicy": PULL_POLICY,
            "command": ["sh", "-c", "until pg_isready -h autoglm-postgres -p 5432 -t 2; do sleep 2; done"],
            "securityContext": {"runAsNonRoot": True, "runAsUser": POSTGRES_UID, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta("autoglm-tune", "tune"),
            "spec": {"completionMode": "Indexed", "completions": workers, "parallelism": workers,
                     "backoffLimitPerIndex": BACKOFF_LIMIT_PER_INDEX,
                     "template": {"metadata": {"labels": selector("tune")}, "spec": pod}}}


def runs_volume(size: str = "20Gi") -> dict[str, Any]:
    """The run directory every worker mounts."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta("autoglm-runs", "tune"),
            # ReadWriteMany (NFS, CephFS, EFS, Filestore...): the workers may land on different nodes
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}


def postgres(size: str = "10Gi") -> list[dict[str, Any]]:
    """A single-replica PostgreSQL with its headless Service and a policy letting only tune workers in."""
    probe = {"exec": {"command": ["pg_isready", "-U", "autoglm", "-d", "autoglm"]}, "periodSeconds": 10}
    container = {
        "name": "postgres", "image": POSTGRES_IMAGE, "imagePullPolicy": PULL_POLICY,
        "env": [_env("POSTGRES_DB", "autoglm"), _env("POSTGRES_USER", "autoglm"),
                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "password"}}},
                _env("PGDATA", "/var/lib/postgresql/data/pgdata")],  # a subdirectory: volume roots hold lost+found
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "readinessProbe": probe, "livenessProbe": dict(probe, periodSeconds=30, failureThreshold=5),
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": POSTGRES_UID, "allowPrivilegeEscalation": False}}
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("autoglm-postgres", "postgres"),
        "spec": {"serviceName": "autoglm-postgres", "replicas": 1, "selector": {"matchLabels": selector("postgres")},
                 "template": {"metadata": {"labels": selector("postgres")},
                              "spec": {"securityContext": {"fsGroup": POSTGRES_UID}, "containers": [container]}},
                 "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                           "spec": {"accessModes": ["ReadWriteOnce"],
                                                    "resources": {"requests": {"storage": size}}}}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta("autoglm-postgres", "postgres"),
               "spec": {"clusterIP": "None", "selector": selector("postgres"),
                        "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres"}]}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": meta("autoglm-postgres", "postgres"),
              "spec": {"podSelector": {"matchLabels": selector("postgres")}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": selector("tune")}}],
                                    "ports": [{"protocol": "TCP", "port": 5432}]}]}}
    return [statefulset, service, policy]
