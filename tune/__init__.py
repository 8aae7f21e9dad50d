"""tune: one Optuna study over training hyperparameters and compression settings, under a joint
accuracy / latency / energy objective, with multi-objective early stopping.

    from tune import AutoTuner
    front = AutoTuner(model_config="charlm", search_space="adaptive-v2", max_trials=100).search(
        train_data="train.bin", validation_data="val.bin", objective="minimize_perplexity")
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoglm.artifacts import RunDir
from autoglm.cli import toml_literal
from autoglm.config import Settings, load_settings, parse_overrides
from autoglm.errors import ConfigError
from autoglm.tasks import Task, get_task, task_class
from tune.early_stop import ParetoHalving, pareto_fronts
from tune.select import Point, pareto_points, select
from tune.space import PRESETS, build_space

__all__ = ["AutoTuner", "ParetoHalving", "Point", "build_space", "pareto_fronts", "select", "tune_run"]


def tune_run(*args, **kwargs):
    """Run the tune stage (see tune.stage.tune_run)."""
    from tune.stage import tune_run as run

    return run(*args, **kwargs)


class AutoTuner:
    """The Python API over the tune stage: builds the config, runs (or resumes) the study, returns the front.

    ``model_config``: the task, by the article's name for it (``task`` by ours). ``search_space``: a preset
    ("default", "training", "compression", "adaptive" alias "adaptive-v2"), a TOML file (str or Path) or a dict
    of knob overrides. ``sampler``: a name ("tpe", "nsga2", "random", "gp") or an Optuna sampler object, used as
    given (seed it yourself); an object is not config, so a run resumed by the CLI uses ``tune.sampler``. ``objectives``: a tuple of "metric", "latency", "energy" (one name alone is one objective).
    ``constraints``: ``{"max_metric_loss": .., "latency_slo_ms": .., "max_joules": ..}``, numbers, or None for
    no latency or energy limit. Anything else goes through ``overrides`` as ``"section.key=value"`` strings or
    a ``config`` file; those win over the arguments.
    """

    def __init__(self, task: str | None = None, search_space: str | Path | Mapping[str, Any] = "default",
                 max_trials: int = 20, timeout: float | None = None, storage: str | None = None,
                 study_name: str | None = None, objectives: str | Sequence[str] = ("metric", "latency", "energy"),
                 constraints: Mapping[str, float | None] | None = None, sampler: Any = "tpe", run: str = "autotune",
                 config: str | Path | None = None, overrides: Sequence[str] = (), model_config: str | None = None):
        if task is not None and model_config is not None and task != model_config:
            raise ConfigError(f"task={task!r} and model_config={model_config!r} both name the task: pass one")
        task = task or model_config or "digits"
        if not isinstance(search_space, str | Path | Mapping):
            raise ConfigError(f"search_space={search_space!r} is not a search space: give a preset name "
                              f"({', '.join(PRESETS)}), the path of a .toml file, or a dict of knob overrides")
        if isinstance(objectives, str):
            objectives = (objectives,)  # one name is one objective (a study may have one), not its letters
        elif not isinstance(objectives, Sequence):
            raise ConfigError(f"objectives={objectives!r}: pass a tuple of 'metric', 'latency', 'energy'")
        if constraints is not None and not isinstance(constraints, Mapping):
            raise ConfigError(f"constraints={constraints!r}: pass a dict such as {{'latency_slo_ms': 5.0}}")
        constraints = dict(constraints or {})
        self.sampler = None if isinstance(sampler, str) else _sampler_object(sampler)
        unknown = set(constraints) - {"max_metric_loss", "latency_slo_ms", "max_joules"}
        if unknown:
            raise ConfigError(f"unknown constraint(s) {sorted(unknown)}: use max_metric_loss, latency_slo_ms, "
                              "max_joules")
        for key, value in constraints.items():
            if value is None and key == "max_metric_loss":
                raise ConfigError("constraints['max_metric_loss']=None: selection always bounds the metric loss "
                                  "vs the best; pass a number (relative, e.g. 0.05 for 5%)")
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ConfigError(f"constraints[{key!r}]={value!r} is not a number: pass a number, or None for "
                                  "no limit")
        values = {"task.name": task, "tune.n_trials": max_trials, "run.name": run,
                  "tune.sampler": sampler if isinstance(sampler, str) else None,
                  "tune.objectives": list(objectives), "tune.timeout_s": timeout, "tune.storage": storage,
                  "tune.study_name": study_name,
                  "tune.search_space": None if isinstance(search_space, Mapping) else str(search_space),
                  **{f"tune.{k}": v for k, v in constraints.items()}}
        # None is "leave it": the default, except a constraint given as None, which is "no limit" (set below)
        sets = [f"{key}={toml_literal(value)}" for key, value in values.items() if value is not None]
        self.search_space = search_space
        self._study = None
        self.settings: Settings = load_settings(config, [*sets, *overrides])
        # TOML has no null, so a None constraint is set on the loaded settings, unless an override sets it
        overridden = parse_overrides(list(overrides)).get("tune", {})
        for key in (k for k, v in constraints.items() if v is None and k not in overridden):
            setattr(self.settings.tune, key, None)
        get_task(self.settings)  # refused here, not at search(): e.g. a data file for a task that brings its own
        if isinstance(search_space, Mapping):  # the dict's knobs, under the explicit tune.space ones
            self.settings.tune.space = {**dict(search_space), **self.settings.tune.space}

    def search(self, train_data: str | Path | None = None, validation_data: str | Path | None = None,
               objective: str | None = None, force: bool = False, callbacks: Sequence[Any] = ()) -> list[Point]:
        """Run the study; returns the Pareto front (``tune/selected.json`` holds the chosen point).

        ``train_data``: a text file (``validation_data``: a text of its own, else its last 10% validates), or a
        nanoGPT ``train.bin`` whose directory also holds ``val.bin`` and ``meta.json`` (then ``validation_data``
        must be that ``val.bin``). ``objective``: ``"<direction>_<metric>"`` over one of the task's metrics
        (charlm: ``"minimize_val_loss"``, ``"minimize_perplexity"``; digits: ``"maximize_accuracy"``,
        ``"minimize_loss"``): the "metric" objective the study optimizes, saved as ``tune.metric``.
        ``callbacks``: passed to ``study.optimize``, each called ``(study, frozen_trial)`` once per finished trial.
        The study is then ``self.study``.
        """
        if not all(callable(c) for c in callbacks):
            raise ConfigError(f"callbacks={list(callbacks)!r}: pass callables taking (study, frozen_trial), as "
                              "optuna's study.optimize(callbacks=...) takes them")
        settings = self.settings
        if train_data is None and validation_data is not None:
            raise ConfigError("validation_data needs train_data: pass the train.bin beside that val.bin as "
                              "train_data")
        if train_data is not None:
            if not task_class(settings.task.name).reads_data:
                raise ConfigError(f"task '{settings.task.name}' uses its bundled data and takes no data file: drop "
                                  "train_data/validation_data, or use a task that reads one (e.g. task='charlm')")
            for name, given in (("train_data", train_data), ("validation_data", validation_data)):
                if given is not None and not Path(given).expanduser().exists():
                    raise ConfigError(f"{name}={str(given)!r} does not exist: give an existing UTF-8 text file, "
                                      "or a nanoGPT train.bin and the val.bin beside it")
            source = _data_source(train_data, validation_data, settings)
            settings = settings.model_copy(update={"task": settings.task.model_copy(update={"data": source})})
        if objective is not None:
            metric = objective_metric(objective, task_class(settings.task.name))
            settings = settings.model_copy(update={"tune": settings.tune.model_copy(update={"metric": metric})})
        from tune.stage import tune_run as run
        from tune.storage import open_study

        run(settings, force=force, sampler=self.sampler, callbacks=list(callbacks))
        tune_dir = RunDir(settings.run.root, settings.run.name).stage_dir("tune")
        task = task_class(settings.task.name)
        metric = settings.tune.metric or task.metric
        self._study = open_study(settings, tune_dir, task.metric_directions()[metric], metric, self.sampler)
        return pareto_points(self._study)

    @property
    def study(self):
        """The ``optuna.Study``: the one ``search()`` ran, else loaded from the run's storage (a run made
        earlier, e.g. by the CLI)."""
        if self._study is None:
            import optuna

            from tune.storage import JOURNAL, make_storage

            tune_dir = RunDir(self.settings.run.root, self.settings.run.name).stage_dir("tune")
            if not self.settings.tune.storage and not (tune_dir / JOURNAL).is_file():
                raise ConfigError(f"no study in {tune_dir} yet: call search() first")
            try:
                self._study = optuna.load_study(study_name=self.settings.tune.study_name,
                                                storage=make_storage(self.settings, tune_dir))
            except KeyError:
                raise ConfigError(f"no study '{self.settings.tune.study_name}' in tune.storage yet: call search() "
                                  "first") from None
        return self._study


def _sampler_object(sampler: Any):
    """``sampler`` if it is an Optuna sampler, else the error naming what to pass."""
    import optuna

    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise ConfigError(f"sampler={sampler!r}: give a name (tpe, nsga2, random, gp) or an optuna.samplers "
                          "object, e.g. optuna.samplers.CmaEsSampler(seed=0)")
    return sampler


def objective_metric(objective: str, task: type[Task]) -> str | None:
    """The ``tune.metric`` that ``objective`` (``"minimize_perplexity"``) names on ``task``: None for the task's
    own metric (the same run as no objective at all); a word that names no metric, or the wrong direction, is
    refused with the task's choices."""
    choices = {f"{direction}_{name}": name for name, direction in task.metric_directions().items()}
    if objective not in choices:
        raise ConfigError(f"objective={objective!r} does not fit task '{task.name}': use one of "
                          f"{sorted(choices)}")
    return None if choices[objective] == task.metric else choices[objective]


def _data_source(train: str | Path, val: str | Path | None, settings: Settings) -> str:
    """``task.data`` for the given files: a text, a nanoGPT directory, or a training and a validation text
    prepared into one directory by the task (``text_pair_dir``; charlm's)."""
    train = Path(train)
    if train.suffix == ".bin":
        if val is None or Path(val).parent.resolve() != train.parent.resolve():
            raise ConfigError("train.bin and val.bin must sit in one directory with meta.json: pass "
                              "validation_data=<that dir>/val.bin")
        return str(train.parent)
    if val is None:
        return str(train)
    pair = getattr(task_class(settings.task.name), "text_pair_dir", None)
    if pair is None or Path(val).suffix == ".bin":
        raise ConfigError(f"task '{settings.task.name}' takes validation_data only as the val.bin beside a "
                          "train.bin, or as a text beside a text train_data where the task supports it (charlm)")
    return str(pair(train, Path(val), settings.run.cache_dir))
