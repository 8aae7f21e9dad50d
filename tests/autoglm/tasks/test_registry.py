"""The task registry resolves a run's task, and that is where ``task.name`` and ``task.model`` are checked."""

from __future__ import annotations

import pytest

from autoglm.config import load_settings
from autoglm.errors import ConfigError
from autoglm.tasks import get_task
from autoglm.tasks.digits import DigitsTask


def test_a_config_with_an_unknown_model_setting_loads_and_the_task_refuses_it():
    settings = load_settings(None, ["task.model.layers=3"])

    with pytest.raises(ConfigError) as err:
        get_task(settings)

    assert str(err.value) == ("unknown model setting(s) ['layers'] for task 'digits': known are "
                              f"{sorted(DigitsTask.model_space)}")


def test_an_unknown_task_is_refused_where_it_is_resolved():
    settings = load_settings(None, ["task.name=nosuchtask"])

    with pytest.raises(ConfigError, match="unknown task 'nosuchtask': use one of"):
        get_task(settings)


def test_an_impossible_architecture_names_the_fix():
    settings = load_settings(None, ["task.name=charlm", "task.model.n_embd=100", "task.model.n_head=8"])

    with pytest.raises(ConfigError, match="n_embd=100 is not divisible by task.model.n_head=8"):
        get_task(settings)


def test_a_valid_config_resolves_to_its_task():
    settings = load_settings(None, ["task.model.channels=8", "run.seed=3"])

    task = get_task(settings)

    assert isinstance(task, DigitsTask) and task.seed == 3


def test_a_task_scored_by_another_of_its_metrics_reports_it_in_that_metric_s_direction():
    task = get_task(load_settings(None, [])).scored_by("loss")

    assert (task.metric, task.direction) == ("loss", "minimize")
    assert (DigitsTask.metric, DigitsTask.direction) == ("accuracy", "maximize")  # the class keeps its own
    assert get_task(load_settings(None, [])).scored_by(None).metric == "accuracy"
    with pytest.raises(ConfigError, match=r"tune.metric='bleu' is not a metric of task 'digits': use one of "
                                          r"\['accuracy', 'loss'\]"):
        get_task(load_settings(None, [])).scored_by("bleu")
