"""The Python API: AutoTuner builds the config, runs the study and returns the Pareto front."""

import json
import random
import re
from pathlib import Path

import pytest

from autoglm.cli import run_main
from autoglm.config import load_settings
from autoglm.errors import ConfigError
from tests.tune import _tiny
from tune import AutoTuner, Point, _data_source, objective_metric
from tune.__main__ import main as tune_main


def test_search_returns_the_pareto_front_as_points(tmp_path):
    tuner = AutoTuner(task="digits", max_trials=3, run="api", search_space={"prune.ratio": 0.0},
                      constraints={"max_metric_loss": 0.5}, overrides=_tiny.overrides(tmp_path, run="api"))

    front = tuner.search()

    tune_dir = tmp_path / "runs" / "api" / "tune"
    selected = json.loads((tune_dir / "selected.json").read_text())
    complete = {t.number for t in _tiny.journal_study(tune_dir).trials if t.state.name == "COMPLETE"}
    assert front and all(isinstance(p, Point) for p in front)
    assert {p.trial for p in front} <= complete and selected["trial"] in {p.trial for p in front}
    assert all(p.params.get("prune.ratio") is None and not p.variant.startswith("pruned") for p in front)
    assert tuner.settings.tune.max_metric_loss == 0.5


def test_train_data_as_a_text_file_tunes_charlm_on_it(tmp_path):
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    rng = random.Random(0)
    text = tmp_path / "tiny.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    tuner = AutoTuner(task="charlm", max_trials=1, run="lm",
                      overrides=_tiny.overrides(tmp_path, "tune.serving_batch=4", "train.eval_batches=2", run="lm",
                                                space=_tiny.CHARLM_SPACE))

    front = tuner.search(train_data=text, objective="minimize_perplexity")

    tune_dir = tmp_path / "runs" / "lm" / "tune"
    manifest = json.loads((tune_dir / "manifest.json").read_text())
    served = json.loads((tune_dir / "trials" / "0000" / "metrics.json").read_text())["variant"]["metrics"]
    evals = [json.loads(line) for line in (tune_dir / "trials" / "0000" / "train.jsonl").read_text().splitlines()]
    assert len(front) == 1 and front[0].objectives["metric"] == served["perplexity"] > 1  # not the val_loss
    assert {e["metric"] for e in evals if e["event"] == "eval"} == {"perplexity"}  # what early stopping compares
    assert manifest["config"]["tune"]["metric"] == "perplexity" and _tiny.journal_study(tune_dir).user_attrs[
        "metric_name"] == "perplexity"
    assert manifest["config"]["task"]["data"] == str(text)
    assert len(list((tmp_path / "cache" / "charlm").iterdir())) == 1  # the text was prepared, not Shakespeare


def _task(name: str, tmp_path):
    return load_settings(None, [f"task.name='{name}'", f"run.cache_dir='{tmp_path / 'cache'}'"])


def test_a_text_file_is_the_data_source_as_is(tmp_path):
    assert _data_source(tmp_path / "input.txt", None, _task("charlm", tmp_path)) == str(tmp_path / "input.txt")


def test_nanogpt_bin_files_name_their_directory(tmp_path):
    assert _data_source(tmp_path / "train.bin", tmp_path / "val.bin", _task("charlm", tmp_path)) == str(tmp_path)


def test_a_validation_text_of_its_own_is_charlm_s_validation_split(tmp_path):
    from autoglm.tasks import corpus
    from autoglm.tasks.charlm import CharLMTask

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("to be or not to be, that is the question. " * 20)
    val.write_text("whether tis nobler in the mind to suffer! " * 10)

    data = Path(_data_source(train, val, _task("charlm", tmp_path)))
    task = CharLMTask(data=str(data), cache_dir=tmp_path / "cache")
    task.prepare()

    itos = corpus.read_meta(data)
    assert itos == sorted(set(train.read_text()) | set(val.read_text()))  # one vocabulary over both texts
    assert "".join(itos[i] for i in corpus.open_tokens(data / "val.bin")) == val.read_text()
    assert "".join(itos[i] for i in corpus.open_tokens(data / "train.bin")) == train.read_text()
    assert _data_source(train, val, _task("charlm", tmp_path)) == str(data)  # prepared once per pair


@pytest.mark.parametrize(("task", "train", "val", "message"), [
    ("charlm", "train.bin", "elsewhere/val.bin", "must sit in one directory"),
    ("charlm", "train.bin", None, "must sit in one directory"),
    ("charlm", "input.txt", "val.bin", "takes validation_data only as the val.bin beside a train.bin"),
    ("tests.autoglm.tasks.user_task:LinearRegressionTask", "input.txt", "val.txt", "or as a text beside a text train_data"),
])
def test_mismatched_data_files_are_refused(tmp_path, task, train, val, message):
    with pytest.raises(ConfigError, match=message):
        _data_source(tmp_path / train, tmp_path / val if val else None, _task(task, tmp_path))


def test_an_objective_the_task_cannot_optimize_is_refused_before_any_trial(tmp_path):
    tuner = AutoTuner(task="digits", max_trials=1, overrides=_tiny.overrides(tmp_path))

    with pytest.raises(ConfigError, match="objective='maximize_bleu'"):
        tuner.search(objective="maximize_bleu")

    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("task", "objective", "choices"), [
    ("charlm", "maximize_perplexity", "['minimize_perplexity', 'minimize_val_loss']"),
    ("digits", "minimize_perplexity", "['maximize_accuracy', 'minimize_loss']"),
    ("digits", "minimize_accuracy", "['maximize_accuracy', 'minimize_loss']"),
])
def test_a_mismatched_objective_is_refused_with_the_task_s_choices(tmp_path, task, objective, choices):
    tuner = AutoTuner(task=task, max_trials=1, overrides=_tiny.overrides(tmp_path))

    with pytest.raises(ConfigError, match=re.escape(f"objective={objective!r} does not fit task '{task}': use one "
                                                    f"of {choices}")):
        tuner.search(objective=objective)

    assert not (tmp_path / "runs").exists()


def test_objective_names_the_tune_metric_and_the_task_s_own_is_none():
    from autoglm.tasks import task_class

    assert objective_metric("minimize_perplexity", task_class("charlm")) == "perplexity"
    assert objective_metric("minimize_val_loss", task_class("charlm")) is None  # the same run as no objective
    assert objective_metric("minimize_loss", task_class("digits")) == "loss"


def test_a_minimized_metric_of_a_maximizing_task_turns_the_study_around(tmp_path):
    tuner = AutoTuner(task="digits", max_trials=1, objectives="metric", run="loss",
                      overrides=_tiny.overrides(tmp_path, "tune.compression_siblings=false", run="loss"))

    front = tuner.search(objective="minimize_loss")

    tune_dir = tmp_path / "runs" / "loss" / "tune"
    metrics = json.loads((tune_dir / "trials" / "0000" / "metrics.json").read_text())
    assert [d.name for d in _tiny.journal_study(tune_dir).directions] == ["MINIMIZE"]
    assert front[0].objectives["metric"] == metrics["variant"]["metrics"]["loss"]
    assert tuner.settings.tune.metric is None  # search() resolves it for its run; the tuner's own config is kept


def test_a_tune_metric_the_task_lacks_is_refused_before_the_run(tmp_path):
    from tune.stage import tune_run

    with pytest.raises(ConfigError, match=r"tune.metric='bleu' is not a metric of task 'digits': use one of "
                                          r"\['accuracy', 'loss'\]"):
        tune_run(_tiny.settings(tmp_path, "tune.metric='bleu'"))
    assert not (tmp_path / "runs").exists()


def test_unknown_constraints_are_refused():
    with pytest.raises(ConfigError, match="unknown constraint"):
        AutoTuner(constraints={"latency_ms": 5})


@pytest.mark.parametrize("text", ["it's", 'say "hi"', "back\\slash", "tab\there"])
def test_quotes_in_arguments_reach_the_settings_as_given(text):
    tuner = AutoTuner(study_name=text, storage=f"sqlite:///{text}.db")

    assert tuner.settings.tune.study_name == text and tuner.settings.tune.storage == f"sqlite:///{text}.db"


def test_the_cli_storage_keeps_its_quotes(capsys):
    assert run_main(tune_main, ["--storage", "sqlite:///it's.db", "--dry-run"]) == 0

    assert '"storage": "sqlite:///it\'s.db"' in capsys.readouterr().out


@pytest.mark.parametrize("space", [5, ["default"], None])
def test_a_search_space_of_another_type_is_refused(space):
    with pytest.raises(ConfigError, match="give a preset name .* the path of a .toml file, or a dict"):
        AutoTuner(search_space=space)


def test_a_search_space_path_is_a_toml_file(tmp_path):
    assert AutoTuner(search_space=tmp_path / "space.toml").settings.tune.search_space == str(tmp_path / "space.toml")


def test_a_none_constraint_means_no_limit_and_a_word_is_refused():
    tuner = AutoTuner(constraints={"latency_slo_ms": None, "max_joules": None},
                      overrides=["tune.max_joules=2.5"])  # an explicit override still wins

    assert tuner.settings.tune.latency_slo_ms is None and tuner.settings.tune.max_joules == 2.5
    with pytest.raises(ConfigError, match=r"constraints\['latency_slo_ms'\]='fast' is not a number"):
        AutoTuner(constraints={"latency_slo_ms": "fast"})


def test_one_objective_may_be_named_alone():
    assert AutoTuner(objectives="metric").settings.tune.objectives == ["metric"]
    with pytest.raises(ConfigError, match="pass a tuple of 'metric', 'latency', 'energy'"):
        AutoTuner(objectives=5)


def test_zero_timeout_or_trials_is_refused_not_dropped(capsys):
    with pytest.raises(ConfigError, match="tune.timeout_s: Input should be greater than 0"):
        AutoTuner(timeout=0)

    assert run_main(tune_main, ["--trials", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tune.n_trials: Input should be greater than or equal to 1 (got 0)" in err and "Traceback" not in err


def test_data_files_are_refused_where_the_task_takes_none_or_they_do_not_exist(tmp_path):
    digits = AutoTuner(max_trials=1, overrides=_tiny.overrides(tmp_path))
    charlm = AutoTuner(task="charlm", max_trials=1, overrides=_tiny.overrides(tmp_path, space=_tiny.CHARLM_SPACE))

    with pytest.raises(ConfigError, match="task 'digits' uses its bundled data and takes no data file"):
        digits.search(train_data=tmp_path / "nonexistent.txt")
    with pytest.raises(ConfigError, match="train_data='.*nonexistent.txt' does not exist"):
        charlm.search(train_data=tmp_path / "nonexistent.txt")
    assert not (tmp_path / "runs").exists()


def test_a_callback_is_called_once_per_trial_with_optuna_s_signature(tmp_path):
    import optuna

    seen = []
    tuner = AutoTuner(max_trials=2, objectives="metric", run="cb",
                      overrides=_tiny.overrides(tmp_path, "tune.compression_siblings=false", run="cb"))

    tuner.search(callbacks=[lambda study, trial: seen.append((study.study_name, trial.number, trial.state))])

    assert [(name, number) for name, number, _ in seen] == [("autoglm", 0), ("autoglm", 1)]
    assert all(state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for *_, state in seen)
    assert len(tuner.study.trials) == 2


def test_an_optuna_sampler_object_draws_the_trials(tmp_path):
    import optuna

    sampler = optuna.samplers.RandomSampler(seed=3)
    tuner = AutoTuner(max_trials=1, objectives="metric", sampler=sampler, run="obj",
                      overrides=_tiny.overrides(tmp_path, "tune.compression_siblings=false", run="obj"))

    tuner.search()

    assert tuner.study.sampler is sampler and tuner.settings.tune.sampler == "tpe"  # the config keeps its name
    with pytest.raises(ConfigError, match="sampler=5: give a name .* or an optuna.samplers object"):
        AutoTuner(sampler=5)


def test_the_study_of_an_earlier_run_is_loaded_from_its_storage(tmp_path):
    first = AutoTuner(max_trials=1, objectives="metric", run="again",
                      overrides=_tiny.overrides(tmp_path, "tune.compression_siblings=false", run="again"))
    later = AutoTuner(max_trials=1, objectives="metric", run="again",
                      overrides=_tiny.overrides(tmp_path, "tune.compression_siblings=false", run="again"))

    with pytest.raises(ConfigError, match="call search\\(\\) first"):
        later.study  # noqa: B018
    first.search()

    assert [t.number for t in later.study.trials] == [t.number for t in first.study.trials] == [0]


def test_the_article_s_example_call_runs_with_autoglm_s_names(tmp_path):
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    rng = random.Random(1)
    texts = [tmp_path / "train.txt", tmp_path / "val.txt"]
    for path, lines in zip(texts, (300, 60), strict=True):
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(lines)))
    data = Path(_data_source(*texts, _task("charlm", tmp_path)))  # nanoGPT's format: train.bin, val.bin, meta

    tuner = AutoTuner(model_config="charlm", search_space="adaptive-v2", max_trials=3, run="article",
                      overrides=_tiny.overrides(tmp_path, "tune.serving_batch=4", "train.eval_batches=2",
                                                "tune.startup_trials=2", "tune.compression_siblings=false",
                                                run="article", space=_tiny.CHARLM_SPACE))
    front = tuner.search(train_data=data / "train.bin", validation_data=data / "val.bin",
                         objective="minimize_perplexity")

    config = json.loads((tmp_path / "runs" / "article" / "tune" / "manifest.json").read_text())["config"]
    assert front and config["task"]["name"] == "charlm" and config["task"]["data"] == str(data)
    assert config["tune"]["search_space"] == "adaptive-v2" and config["tune"]["metric"] == "perplexity"
    assert type(tuner.study.sampler).__name__ == "Narrowing" and len(tuner.study.trials) == 3
    with pytest.raises(ConfigError, match="both name the task"):
        AutoTuner(task="digits", model_config="charlm")
