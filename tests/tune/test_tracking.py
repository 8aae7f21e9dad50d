"""MLflow tracking: each trial a nested run (params, named objectives, state), the stage's files as artifacts.

Read back with MLflow's own client from a local sqlite: store.
"""

import importlib.util
import sys

import optuna
import pytest

from autoglm.errors import ConfigError, MissingExtraError
from tests.tune import _tiny
from tune import attributes as attrs
from tune.tracking import MLflowTracker

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="the mlflow extra is not installed")


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _trials(client, tracker):
    runs = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent}'")
    return {int(r.data.tags["optuna.trial"]): r for r in runs}


def _study():
    """Three trials as the objective leaves them: one complete, one stopped at its rung, one failed."""
    study = optuna.create_study(study_name="tiny", directions=["maximize", "minimize"])
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    study.add_trial(optuna.trial.create_trial(
        values=[0.9, 1.5], params={"train.lr": 0.01}, distributions=dist,
        user_attrs={"objectives": {"metric": 0.9, "latency": 1.5}, "history": [[20, 0.5], [40, 0.8]],
                    "steps": 40, "compute": {"cpu_s": 2.0, "wall_s": 1.0, "joules": 3.0,
                                             "energy_method": "estimated (cpu-s x W/core)"},
                    "variant": {"name": "int8-static"}}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params={"train.lr": 0.05}, distributions=dist,
        user_attrs={"history": [[20, 0.3]], "stopped_at": 20}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"train.lr": 0.001}, distributions=dist,
        user_attrs={"error": "RuntimeError: boom"}))
    return study


@needs_mlflow
def test_each_trial_is_a_nested_run_with_its_params_objectives_and_state(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = _study()
    tracker = MLflowTracker(uri, study, "r1", "accuracy")

    for trial in study.trials:
        tracker(study, trial)

    client = _client(uri)
    runs = _trials(client, tracker)
    assert sorted(runs) == [0, 1, 2]
    done, stopped, failed = runs[0], runs[1], runs[2]
    assert done.data.params == {"train.lr": "0.01"}
    assert done.data.metrics["metric"] == 0.9 and done.data.metrics["accuracy"] == 0.9
    assert done.data.metrics["latency"] == 1.5 and done.data.metrics["compute.joules"] == 3.0
    assert done.info.status == "FINISHED" and done.data.tags["optuna.state"] == "COMPLETE"
    assert done.data.tags["variant"] == "int8-static" and done.data.tags["energy_method"].startswith("estimated")
    curve = client.get_metric_history(done.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(20, 0.5), (40, 0.8)]
    assert stopped.info.status == "KILLED" and stopped.data.tags["optuna.state"] == "PRUNED"
    assert stopped.data.metrics["stopped_at"] == 20 and "metric" not in stopped.data.metrics
    assert failed.info.status == "FAILED" and failed.data.tags["autoglm.error"] == "RuntimeError: boom"
    assert client.get_experiment(tracker.experiment_id).name == "tiny"


@needs_mlflow
def test_a_resumed_study_logs_into_the_same_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = _study()

    first = MLflowTracker(uri, study, "r1", "accuracy")
    first.log_stage(tmp_path)  # the stage ended: the parent is finished
    again = MLflowTracker(uri, study, "r1", "accuracy")

    assert again.parent == first.parent == attrs.MLFLOW_RUN.get(study)
    assert _client(uri).get_run(again.parent).info.status == "RUNNING"


@needs_mlflow
def test_an_unusable_store_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="tune.mlflow_uri"):
        MLflowTracker("nosuchscheme://x", _study(), "r1", "accuracy")


@needs_mlflow
def test_the_tune_stage_logs_its_trials_manifest_and_report(tmp_path):
    from tune.stage import tune_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = _tiny.settings(tmp_path, "tune.n_trials=3", f"tune.mlflow_uri='{uri}'",
                              "tune.compression_siblings=false", run="tracked")

    tune_run(settings, progress=False)

    client = _client(uri)
    experiment = client.get_experiment_by_name("autoglm")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`autoglm.run` = 'tracked'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    assert all({"train.lr", "quantize.mode", "prune.ratio"} <= set(r.data.params) for r in children)
    assert {"metric", "latency", "energy"} <= set(next(r for r in children if r.info.status == "FINISHED")
                                                  .data.metrics)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/manifest.json", "tune/report.html", "tune/selected.json"} <= files
    assert parent.info.status == "FINISHED" and parent.data.metrics["tune.complete"] >= 1
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in the working directory


@needs_mlflow
def test_the_tracking_uri_is_not_part_of_the_stage_config(tmp_path, capsys):
    from tune.stage import tune_run

    settings = _tiny.settings(tmp_path, "tune.n_trials=2", "tune.compression_siblings=false", run="same")
    tune_run(settings, progress=False)
    tracked = _tiny.settings(tmp_path, "tune.n_trials=2", "tune.compression_siblings=false",
                             f"tune.mlflow_uri='sqlite:///{tmp_path / 'm.db'}'", run="same")

    tune_run(tracked, progress=False)

    assert "up to date" in capsys.readouterr().out


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails, as when it is not installed

    with pytest.raises(MissingExtraError, match=r"autoglm\[mlflow\]"):
        MLflowTracker("sqlite:///x.db", _study(), "r1", "accuracy")


def test_the_tune_command_takes_the_tracking_uri(capsys):
    from autoglm.cli import run_main
    from tune.__main__ import main as tune_main

    assert run_main(tune_main, ["--mlflow", "sqlite:///runs/mlflow.db", "--dry-run"]) == 0
    assert '"mlflow_uri": "sqlite:///runs/mlflow.db"' in capsys.readouterr().out


@needs_mlflow
def test_a_later_stage_logs_into_the_runs_parent_and_a_failing_store_only_warns(tmp_path, caplog):
    from types import SimpleNamespace

    from autoglm.tracking import track_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, _study(), "r1", "accuracy")
    stage = tmp_path / "runs" / "r1" / "compress"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text("{}")
    (stage.parent / "report.html").write_text("<html>")
    settings = SimpleNamespace(tune=SimpleNamespace(mlflow_uri=uri, study_name="tiny"), run=SimpleNamespace(name="r1"))

    track_stage(settings, stage, ("manifest.json", "variants.json", "../report.html"), {"n": 2, "why": "text"})
    settings.tune.mlflow_uri = "nosuchscheme://x"
    track_stage(settings, stage, ("manifest.json",))

    client = _client(uri)
    assert {a.path for a in client.list_artifacts(tracker.parent, "compress")} == {"compress/manifest.json",
                                                                                   "compress/report.html"}
    assert client.get_run(tracker.parent).data.metrics == {"compress.n": 2.0}
    assert "compress not logged" in caplog.text


@needs_mlflow
def test_a_wrong_tracking_uri_is_refused_before_the_finished_study_is_invalidated(tmp_path):
    from autoglm.artifacts import RunDir
    from tune.stage import tune_run

    base = ("tune.n_trials=2", "tune.compression_siblings=false")
    tune_run(_tiny.settings(tmp_path, *base, run="kept"), progress=False)
    changed = _tiny.settings(tmp_path, *base, "tune.n_trials=3", "tune.mlflow_uri='nosuchscheme://x'", run="kept")

    with pytest.raises(ConfigError, match="tune.mlflow_uri"):
        tune_run(changed, progress=False)

    assert RunDir(tmp_path / "runs", "kept").state("tune") == "complete"
