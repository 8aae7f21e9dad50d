"""tune: one Optuna study over training hyperparameters and compression settings, under a joint
accuracy / latency / energy objective, with multi-objective early stopping.

    from tune import AutoTuner
    front = AutoTuner(task="charlm", max_trials=20).search(train_data="train.bin", validation_data="val.bin")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoglm.config import Settings, load_settings
from autoglm.errors import ConfigError
from tune.early_stop import ParetoHalving, pareto_fronts
from tune.select import Point, select
from tune.space import build_space

__all__ = ["AutoTuner", "ParetoHalving", "Point", "build_space", "pareto_fronts", "select", "tune_run"]


def tune_run(*args, **kwargs):
    """Run the tune stage (see tune.stage.tune_run)."""
    from tune.stage import tune_run as run

    return run(*args, **kwargs)


class AutoTuner:
    """The Python API over the tune stage: builds the config, runs (or resumes) the study, returns the front.

    ``search_space``: a preset ("default", "training", "compression"), a TOML file or a dict of knob
    overrides. ``constraints``: ``{"max_metric_loss": .., "latency_slo_ms": .., "max_joules": ..}``.
    Anything else goes through ``overrides`` as ``"section.key=value"`` strings or a ``config`` file.
    """

    def __init__(self, task: str = "digits", search_space: str | Mapping[str, Any] = "default",
                 max_trials: int = 20, timeout: float | None = None, storage: str | None = None,
                 study_name: str | None = None, objectives: Sequence[str] = ("metric", "latency", "energy"),
                 constraints: Mapping[str, float] | None = None, sampler: str = "tpe", run: str = "autotune",
                 config: str | Path | None = None, overrides: Sequence[str] = ()):
        sets = [f"task.name='{task}'", f"tune.n_trials={max_trials}", f"tune.sampler='{sampler}'",
                f"run.name='{run}'", "tune.objectives=[" + ", ".join(f"'{o}'" for o in objectives) + "]"]
        sets += [f"tune.timeout_s={timeout}"] if timeout else []
        sets += [f"tune.storage='{storage}'"] if storage else []
        sets += [f"tune.study_name='{study_name}'"] if study_name else []
        unknown = set(constraints or {}) - {"max_metric_loss", "latency_slo_ms", "max_joules"}
        if unknown:
            raise ConfigError(f"unknown constraint(s) {sorted(unknown)}: use max_metric_loss, latency_slo_ms, "
                              "max_joules")
        sets += [f"tune.{k}={v}" for k, v in (constraints or {}).items()]
        self.search_space = search_space
        self.settings: Settings = load_settings(config, [*sets, *overrides])
        if isinstance(search_space, str):
            self.settings.tune.search_space = search_space

    def search(self, train_data: str | Path | None = None, validation_data: str | Path | None = None,
               objective: str | None = None, force: bool = False) -> list[Point]:
        """Run the study; returns the Pareto front (``tune/selected.json`` holds the chosen point).

        ``train_data``: a text file, or a nanoGPT ``train.bin`` whose directory also holds ``val.bin``
        and ``meta.json`` (then ``validation_data`` must be that ``val.bin``). ``objective`` is accepted
        for the design's ``"minimize_perplexity"`` spelling and checked against the task's metric.
        """
        settings = self.settings
        if train_data is not None:
            settings = settings.model_copy(update={"task": settings.task.model_copy(
                update={"data": _data_source(train_data, validation_data)})})
        if objective and objective.removeprefix("minimize_").removeprefix("maximize_") not in (
                "perplexity", "val_loss", "loss", "accuracy", "metric"):
            raise ConfigError(f"objective={objective!r}: use e.g. 'minimize_perplexity' or 'maximize_accuracy'")
        if isinstance(self.search_space, Mapping):
            settings.tune.space = {**dict(self.search_space), **settings.tune.space}
        from tune.stage import tune_run as run
        from tune.storage import open_study

        run(settings, force=force)
        from autoglm.artifacts import RunDir
        from tune.select import pareto_points

        tune_dir = RunDir(settings.run.root, settings.run.name).stage_dir("tune")
        from autoglm.tasks import task_class

        study = open_study(settings, tune_dir, task_class(settings.task.name).direction)
        return pareto_points(study)


def _data_source(train: str | Path, val: str | Path | None) -> str:
    train = Path(train)
    if train.suffix == ".bin":
        if val is None or Path(val).parent.resolve() != train.parent.resolve():
            raise ConfigError("train.bin and val.bin must sit in one directory with meta.json: pass "
                              "validation_data=<that dir>/val.bin")
        return str(train.parent)
    if val is not None:
        raise ConfigError("validation_data is only for train.bin/val.bin pairs: a text file is split 90/10")
    return str(train)
