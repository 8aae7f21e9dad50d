"""The study in MLflow (``tune.mlflow_uri``): each finished trial a nested run of the study's parent run.

A trial's run holds its parameters, its objectives by name (``metric`` also under the task metric's own name),
its state (a stopped trial is KILLED, a failed one FAILED, with why), its validation curve as
``val_<metric>`` over steps, and its compute. When the stage completes, the parent gets its manifest, report,
front and selection (:mod:`autoglm.tracking`, which later stages use too).

Not optuna-integration's ``MLflowCallback``: it is deprecated (Optuna 4.9, removed in 6.0), sets the
process-global ``mlflow`` tracking URI, logs objectives as ``value_0..n`` and a stopped trial with no values at
all, and writes every user attribute (checkpoint paths, whole variant records) as a truncated tag. A store
that fails mid-study costs a warning here, not the study.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from autoglm.tracking import log_stage, new_parent, open_store
from tune import attributes as attrs

log = logging.getLogger(__name__)

# Optuna's trial state -> MLflow's run status (a stopped trial was ended early on purpose: KILLED)
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
STAGE_FILES = ("manifest.json", "report.html", "pareto.json", "selected.json", "config.json")


class MLflowTracker:
    """An Optuna callback ``(study, frozen_trial)`` logging each finished trial as a nested MLflow run.

    Opened (store reached, experiment and parent run found or made) at construction, so a wrong URI or an
    unreachable server is refused before any trial trains. The parent run's id is kept on the study
    (:data:`tune.attributes.MLFLOW_RUN`): a resumed study goes on logging into the same parent.
    """

    def __init__(self, uri: str, study, run_name: str, metric_name: str):
        self.uri, self.metric_name = uri, metric_name
        self.client, self.experiment_id = open_store(uri, study.study_name)
        self.parent = self._parent(study, run_name)
        self._warned = False

    def _parent(self, study, run_name: str) -> str:
        """The study's parent run: the one its attribute names (a resumed study), else a new one."""
        known = attrs.MLFLOW_RUN.get(study)
        if known:
            if self.client.get_run(known).info.status != "RUNNING":
                self.client.update_run(known, status="RUNNING")
            return known
        parent = new_parent(self.client, self.experiment_id, run_name, {
            "optuna.study": study.study_name, "optuna.directions": _directions(study)})
        attrs.MLFLOW_RUN.set(study, parent)
        return parent

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

    def log_stage(self, stage_dir: Path, metrics: dict[str, Any] | None = None) -> None:
        """The completed stage's files and totals into the parent run, then the parent finished."""
        log_stage(self.client, self.parent, stage_dir, STAGE_FILES, metrics)
        self.client.set_terminated(self.parent, status="FINISHED")


def trial_record(trial, study, metric_name: str) -> tuple[list[tuple[str, float, int]], dict[str, str]]:
    """(metrics as (key, value, step), tags) for one trial. Objectives keep their names (``metric`` is also
    logged under the task metric's own name); a stopped trial has none, its validation curve (``val_<metric>``
    over training steps) ends at the rung that stopped it."""
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
    for attr in (attrs.STEPS, attrs.STOPPED_AT):
        if attr.get(trial) is not None:
            metrics.append((attr.key, float(attr.get(trial)), 0))
    tags = {"optuna.state": trial.state.name, "optuna.directions": _directions(study)}
    variant = attrs.VARIANT.get(trial, {})
    if variant.get("name"):
        tags["variant"] = variant["name"]
    if compute.get("energy_method"):
        tags["energy_method"] = compute["energy_method"]
    for attr in (attrs.ERROR, attrs.RETRY_OF, attrs.SIBLING_OF, attrs.WARM_START, attrs.PORTFOLIO, attrs.CACHE_HIT):
        if attr.on(trial):
            tags[f"autoglm.{attr.key}"] = attr.get(trial)
    return metrics, tags


def _directions(study) -> str:
    return ",".join(d.name.lower() for d in study.directions)


def _ms(when) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None
