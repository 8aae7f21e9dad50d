"""MLflow tracking of a run: each stage's manifest and report as artifacts of one parent run.

``tune.mlflow_uri`` (``autoglm tune --mlflow URI``) names the store: ``sqlite:///runs/mlflow.db`` locally, a
server's ``http(s)://`` URL in production (``file:`` stores need MLflow's ``MLFLOW_ALLOW_FILE_STORE=true``).
The experiment is named after the study (``tune.study_name``); the parent run is named and tagged after the
AutoGLM run, and each stage that completes logs its files under ``<stage>/`` in it. The tune stage makes the
parent and adds each trial as a nested run (:mod:`tune.tracking`). Talks to the store through its own
``MlflowClient``: nothing process-global is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from autoglm._lazy import require
from autoglm.errors import ConfigError

log = logging.getLogger(__name__)

RUN_TAG = "autoglm.run"  # on the parent run: the AutoGLM run (runs/<name>) it tracks


def open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id): the store reached and the experiment found or made, else a ConfigError
    naming the setting (a wrong URI or an unreachable server is refused before a stage does any work)."""
    require("mlflow", purpose="tune.mlflow_uri")
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=_artifact_location(uri))
    except Exception as exc:  # MlflowException, connection errors: the message says which
        raise ConfigError(f"tune.mlflow_uri={uri!r}: MLflow could not open it ({exc}); give a reachable tracking "
                          "server URL or a local sqlite:///path/mlflow.db") from exc
    return client, experiment_id


def new_parent(client, experiment_id: str, run_name: str, tags: Mapping[str, str] = ()) -> str:
    """A new parent run for the AutoGLM run ``run_name``; returns its id."""
    return client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name, **dict(tags)}).info.run_id


def latest_parent(client, experiment_id: str, run_name: str) -> str:
    """The newest parent run of the AutoGLM run ``run_name`` (the last tune study's), a new one if none."""
    runs = client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else new_parent(client, experiment_id, run_name)


def log_stage(client, parent: str, stage_dir: Path, files: Sequence[str],
              metrics: Mapping[str, Any] | None = None) -> None:
    """``files`` (relative to ``stage_dir``; those present) as artifacts under ``<stage>/`` of the parent run,
    each by its own name, and the manifest's numeric metrics as the parent's ``<stage>.<name>``."""
    from mlflow.entities import Metric

    stage_dir = Path(stage_dir)
    for name in files:
        if (stage_dir / name).is_file():
            client.log_artifact(parent, str(stage_dir / name), artifact_path=stage_dir.name)
    now = int(time.time() * 1000)
    numbers = [Metric(f"{stage_dir.name}.{k}", float(v), now, 0) for k, v in (metrics or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers:
        client.log_batch(parent, metrics=numbers)


def track_stage(settings, stage_dir: Path, files: Sequence[str], metrics: Mapping[str, Any] | None = None) -> None:
    """After a stage completed: log it into the run's parent run when ``tune.mlflow_uri`` is set. The stage is
    done whatever the store does, so a failure here is a warning."""
    uri = settings.tune.mlflow_uri
    if not uri:
        return
    try:
        client, experiment_id = open_store(uri, settings.tune.study_name)
        log_stage(client, latest_parent(client, experiment_id, settings.run.name), stage_dir, files, metrics)
    except Exception as exc:
        log.warning("MLflow tracking at %s: %s not logged: %s", uri, Path(stage_dir).name, exc)


def _artifact_location(uri: str) -> str | None:
    """Beside the database for a local ``sqlite:`` store (MLflow's default, ``./mlruns``, is relative to
    whatever directory the process runs in); the server's or the store's own choice otherwise."""
    if urlparse(uri).scheme != "sqlite" or uri in ("sqlite://", "sqlite:///:memory:"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent.resolve() / "mlartifacts").as_uri()
