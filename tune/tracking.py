"""Experiment tracking: the study's trials, and the stage's manifest and report, in an MLflow tracking store.

``tune.mlflow_uri`` (``--mlflow URI``) names the store: ``sqlite:///runs/mlflow.db`` locally, a server's
``http(s)://`` URL in production (``file:`` stores need MLflow's ``MLFLOW_ALLOW_FILE_STORE=true``). The
experiment is named after the study; one parent run per study, named after the AutoGLM run, holds each trial
as a nested run (parameters, named objectives, state, the validation curve, compute) and, when the stage
completes, its manifest, report, front and selection as artifacts.

Not optuna-integration's ``MLflowCallback``: it is deprecated (Optuna 4.9, removed in 6.0), configures the
process-global ``mlflow`` tracking URI, logs objectives as ``value_0..n`` and a pruned trial with no values at
all, and writes every user attribute (checkpoint paths, whole variant records) as a truncated tag. This one
talks to the store through its own ``MlflowClient``, and a store that fails mid-study costs a warning, not
the study.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from autoglm._lazy import require
from autoglm.errors import ConfigError
from tune import attributes as attrs

log = logging.getLogger(__name__)

# Optuna's trial state -> MLflow's run status (a stopped trial was ended early on purpose: KILLED)
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
RUN_TAG = "autoglm.run"  # the AutoGLM run (runs/<name>) a parent run tracks
STAGE_FILES = ("manifest.json", "report.html", "pareto.json", "selected.json", "config.json")


class MLflowTracker:
    """An Optuna callback ``(study, frozen_trial)`` logging each finished trial as a nested MLflow run.

    Opened (store reached, experiment and parent run found or made) at construction, so a wrong URI or an
    unreachable server is refused before any trial trains. The parent run's id is kept on the study
    (:data:`tune.attributes.MLFLOW_RUN`): a resumed study goes on logging into the same parent.
    """

    def __init__(self, uri: str, study, run_name: str, metric_name: str):
        require("mlflow", purpose="tune.mlflow_uri")
        from mlflow import MlflowClient

        self.uri, self.metric_name = uri, metric_name
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(study.study_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                study.study_name, artifact_location=_artifact_location(uri))
            self.parent = self._parent(study, experiment_id, run_name)
        except Exception as exc:  # MlflowException, connection errors: the message says which
            raise ConfigError(f"tune.mlflow_uri={uri!r}: MLflow could not open it ({exc}); give a reachable "
                              "tracking server URL or a local sqlite:///path/mlflow.db") from exc
        self.experiment_id = experiment_id
        self._warned = False

    def _parent(self, study, experiment_id: str, run_name: str) -> str:
        """The study's parent run: the one its attribute names (a resumed study), else a new one."""
        known = attrs.MLFLOW_RUN.get(study)
        if known:
            run = self.client.get_run(known)
            if run.info.status != "RUNNING":
                self.client.update_run(known, status="RUNNING")
            return known
        directions = ",".join(d.name.lower() for d in study.directions)
        run = self.client.create_run(experiment_id, run_name=run_name, tags={
            RUN_TAG: run_name, "optuna.study": study.study_name, "optuna.directions": directions})
        attrs.MLFLOW_RUN.set(study, run.info.run_id)
        return run.info.run_id

    def __call__(self, study, trial) -> None:
        try:
            self.log_trial(study, trial)
        except Exception as exc:  # tracking is a record of the study, never a reason to stop it
            if not self._warned:
                log.warning("MLflow tracking at %s failed (trial %d not logged; later failures silent): %s",
                            self.uri, trial.number, exc)
                self._warned = True

    def log_trial(self, study, trial) -> str:
        """One nested run for ``trial``; returns its run id."""
        from mlflow.entities import Metric, Param, RunTag

        start = _ms(trial.datetime_start)
        run = self.client.create_run(self.experiment_id, start_time=start, run_name=f"trial {trial.number}",
                                     tags={"mlflow.parentRunId": self.parent, "optuna.trial": str(trial.number)})
        metrics, tags = trial_record(trial, study, self.metric_name)
        at = _ms(trial.datetime_complete) or start or 0
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(key, value, at, step) for key, value, step in metrics],
            params=[Param(k, str(v)[:6000]) for k, v in trial.params.items()],
            tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, status=STATUS.get(trial.state.name, "FAILED"),
                                   end_time=_ms(trial.datetime_complete))
        return run.info.run_id

    def log_stage(self, stage_dir: Path, metrics: dict[str, Any] | None = None,
                  files: tuple[str, ...] = STAGE_FILES) -> None:
        """The stage's files (those present) as artifacts under ``<stage>/`` of the parent run, its numeric
        metrics (the manifest's totals) as the parent's, then the parent run finished."""
        from mlflow.entities import Metric

        stage = Path(stage_dir).name
        for name in files:
            if (Path(stage_dir) / name).is_file():
                self.client.log_artifact(self.parent, str(Path(stage_dir) / name), artifact_path=stage)
        numbers = {k: float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            self.client.log_batch(self.parent, metrics=[Metric(f"{stage}.{k}", v, _now_ms(), 0)
                                                        for k, v in numbers.items()])
        self.client.set_terminated(self.parent, status="FINISHED")


def trial_record(trial, study, metric_name: str) -> tuple[list[tuple[str, float, int]], dict[str, str]]:
    """(metrics as (key, value, step), tags) for one trial. Objectives keep their names (``metric`` is also
    logged under the task metric's own name); a stopped trial logs its last rung's values; the validation
    curve is ``val_<metric>`` over training steps."""
    metrics: list[tuple[str, float, int]] = []
    objectives = attrs.OBJECTIVES.get(trial)
    steps = attrs.STEPS.get(trial, attrs.STOPPED_AT.get(trial, 0)) or 0
    if objectives:
        for name, value in objectives.items():
            metrics.append((name, float(value), steps))
        if "metric" in objectives:
            metrics.append((metric_name, float(objectives["metric"]), steps))
    for step, value in attrs.HISTORY.get(trial, []):
        metrics.append((f"val_{metric_name}", float(value), int(step)))
    compute = attrs.COMPUTE.get(trial, {})
    for key in ("wall_s", "cpu_s", "joules"):
        if isinstance(compute.get(key), int | float):
            metrics.append((f"compute.{key}", float(compute[key]), steps))
    for key in ("steps", "stopped_at"):
        if trial.user_attrs.get(key) is not None:
            metrics.append((key, float(trial.user_attrs[key]), 0))
    tags = {"optuna.state": trial.state.name, "optuna.directions":
            ",".join(d.name.lower() for d in study.directions)}
    variant = attrs.VARIANT.get(trial, {})
    if variant.get("name"):
        tags["variant"] = variant["name"]
    if compute.get("energy_method"):
        tags["energy_method"] = compute["energy_method"]
    for attr in (attrs.ERROR, attrs.RETRY_OF, attrs.SIBLING_OF, attrs.WARM_START, attrs.CACHE_HIT):
        if attr.on(trial):
            tags[f"autoglm.{attr.key}"] = attr.get(trial)
    return metrics, tags


def _artifact_location(uri: str) -> str | None:
    """Beside the database for a local ``sqlite:`` store (MLflow's default, ``./mlruns``, is relative to
    whatever directory the process runs in); the server's or the store's own choice otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or uri in ("sqlite://", "sqlite:///:memory:"):
        return None
    database = Path(uri[len("sqlite:///"):])
    return (database.parent.resolve() / "mlartifacts").as_uri()


def _ms(when) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
