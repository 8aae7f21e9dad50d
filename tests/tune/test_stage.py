"""A tiny tune study on digits end to end, then compress consuming its selection."""

import json

import pytest

from autoglm.artifacts import RunDir
from autoglm.cli import cli
from autoglm.tasks.checkpoint import load_checkpoint
from autoglm.tasks.digits import DigitsTask
from tests.tune import _tiny
from tune.early_stop import pareto_fronts
from tune.stage import tune_run

N_TRIALS = 6


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """(settings, tune dir, manifest) of one finished six-trial study, shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    settings = _tiny.settings(root, f"tune.n_trials={N_TRIALS}", run="e2e")
    manifest = tune_run(settings, progress=False)
    return settings, RunDir(settings.run.root, "e2e").stage_dir("tune"), manifest


def _minimized(values):
    return [-values[0], *values[1:]]  # accuracy is maximized


def test_the_study_yields_its_pareto_front(study_run):
    settings, tune_dir, _ = study_run
    study = _tiny.journal_study(tune_dir)

    pareto = json.loads((tune_dir / "pareto.json").read_text())

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    front = {complete[i].number for i in pareto_fronts([_minimized(t.values) for t in complete])[0]}
    assert len(study.trials) == N_TRIALS and complete
    assert pareto["objectives"] == ["metric", "latency", "energy"]
    assert {p["trial"] for p in pareto["points"]} == front
    for point in pareto["points"]:
        assert (tune_dir / point["checkpoint"]).is_file()
        assert json.loads((tune_dir / f"trials/{point['trial']:04d}/metrics.json").read_text())["objectives"] == \
            point["objectives"]


def test_the_best_trials_compression_siblings_reuse_its_trained_checkpoint(study_run):
    _, tune_dir, _ = study_run
    trials = _tiny.journal_study(tune_dir).trials

    siblings = [t for t in trials if "sibling_of" in t.user_attrs]

    assert siblings  # the first trial is the best so far: its siblings run next
    for sibling in siblings:
        parent = trials[sibling.user_attrs["sibling_of"]]
        assert sibling.user_attrs["cache_hit"] and sibling.user_attrs["training_key"] == parent.user_attrs[
            "training_key"]
        assert sibling.params["train.lr"] == parent.params["train.lr"] and sibling.params["prune.ratio"] == 0.0
        assert sibling.params["quantize.mode"] != parent.params["quantize.mode"] or parent.params["prune.ratio"] > 0
        # no retraining: a sibling costs compression, scoring and timing only
        assert sibling.user_attrs["compute"]["cpu_s"] < parent.user_attrs["compute"]["cpu_s"]


def test_each_trial_times_its_graph_once(study_run):
    settings, tune_dir, _ = study_run
    complete = [t for t in _tiny.journal_study(tune_dir).trials if t.state.name == "COMPLETE"]
    serving = str(settings.tune.serving_batch)

    assert any(t.user_attrs.get("cache_hit") for t in complete) and any("probe" in t.user_attrs for t in complete)
    for trial in complete:
        profile = trial.user_attrs["variant"]["profile"]
        assert set(profile) == {"1", serving}
        if trial.user_attrs.get("cache_hit"):  # it never trains, so no rung would read a probe
            assert "probe" not in trial.user_attrs
        else:  # timed before training for the rungs; those timings are its objectives, not a second run
            assert trial.user_attrs["probe"] == {"latency": profile[serving]["p95_ms"],
                                                 "energy": profile[serving]["j_per_item"]}
            assert trial.user_attrs["objectives"]["latency"] == profile[serving]["p95_ms"]


def test_the_selected_point_names_a_checkpoint_that_loads(study_run):
    _, tune_dir, _ = study_run
    pareto = json.loads((tune_dir / "pareto.json").read_text())

    selected = json.loads((tune_dir / "selected.json").read_text())
    model = load_checkpoint(tune_dir / selected["checkpoint"]).build_model(DigitsTask())

    assert selected["trial"] in {p["trial"] for p in pareto["points"]}
    assert model.model_args == {"channels": 8, "hidden": 32, "dropout": 0.0}
    assert selected["variant"] == selected["compress"]["variants"][0]
    assert selected["why"]["rule"] and selected["compute"]["cpu_s"] > 0


def test_every_completed_trial_keeps_the_log_of_the_training_its_model_came_from(study_run):
    _, tune_dir, _ = study_run
    complete = [t for t in _tiny.journal_study(tune_dir).trials if t.state.name == "COMPLETE"]
    trainer = {t.user_attrs["training_key"]: t.number for t in complete if not t.user_attrs.get("cache_hit")}

    assert any(t.user_attrs.get("cache_hit") for t in complete)
    for trial in complete:
        log = tune_dir / "trials" / f"{trial.number:04d}" / "train.jsonl"
        trained = tune_dir / "trials" / f"{trainer[trial.user_attrs['training_key']]:04d}" / "train.jsonl"
        assert log.read_text() == trained.read_text() and '"eval"' in log.read_text()


def test_a_trial_hands_compress_only_the_passes_its_variant_applies(study_run):
    _, tune_dir, _ = study_run
    complete = [t for t in _tiny.journal_study(tune_dir).trials if t.state.name == "COMPLETE"]

    assert {t.user_attrs["variant"]["name"] for t in complete} > {"fp32"}
    for trial in complete:
        chosen, name = trial.user_attrs["compress"], trial.user_attrs["variant"]["name"]
        assert chosen["variants"] == [name]
        assert ("quantize" in chosen) == ("int8" in name) and ("prune" in chosen) == name.startswith("pruned")
        if "quantize" in chosen:
            assert chosen["quantize"]["mode"] == trial.params["quantize.mode"]


def test_the_report_is_self_contained_with_plots_and_the_trial_table(study_run):
    _, tune_dir, _ = study_run
    selected = json.loads((tune_dir / "selected.json").read_text())

    page = (tune_dir / "report.html").read_text()

    # front, hypervolume, best metric vs compute, training curves (this training logs no feedback signals)
    assert page.count("<img src='data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # opens offline
    assert page.split("<h2>Trials</h2>")[1].count("<tr>") == N_TRIALS + 1  # header + one row per trial
    assert "<h2>Parameter importances</h2>" in page
    assert f"Selected: trial {selected['trial']}" in page


def test_the_manifest_totals_the_compute_of_every_trial(study_run):
    _, tune_dir, manifest = study_run
    trials = _tiny.journal_study(tune_dir).trials

    totals = manifest.metrics

    assert totals["trials"] == N_TRIALS == totals["complete"] + totals["pruned"] + totals["failed"]
    assert totals["cpu_s"] == pytest.approx(sum(t.user_attrs["compute"]["cpu_s"] for t in trials))
    assert totals["joules"] > 0 and totals["energy_method"]
    assert manifest.energy["study"]["method"] == totals["energy_method"]
    assert {"pareto.json", "selected.json", "report.html"} <= set(manifest.outputs)


def test_running_again_skips_the_finished_study(study_run, capsys):
    settings, tune_dir, manifest = study_run

    again = tune_run(settings, progress=False)

    assert "up to date" in capsys.readouterr().out
    assert again.created == manifest.created
    assert len(_tiny.journal_study(tune_dir).trials) == N_TRIALS


def test_compress_consumes_the_selection(study_run):
    settings, tune_dir, _ = study_run
    selected = json.loads((tune_dir / "selected.json").read_text())
    flags = [f for o in _tiny.overrides(tune_dir.parents[2], "compress.variants=['fp32']", "measure.repeats=3",
                                        "compress.max_metric_loss=1.0", run="e2e") for f in ("--set", o)]

    code = cli(["compress", *flags])

    run = RunDir(settings.run.root, "e2e")
    manifest = run.manifest("compress")
    assert code == 0
    assert list(manifest.inputs) == ["tune/manifest.json"]
    assert manifest.config["source"].endswith(selected["checkpoint"])
    choice = manifest.metrics["recommendation"]
    if choice["replaced"] is None:
        assert manifest.metrics["recommended"] == selected["variant"]
    else:  # compress measured the selection dominated by another variant: it says which, and by which
        assert choice["replaced"]["variant"] == selected["variant"]
        assert choice["replaced"]["by"] == manifest.metrics["recommended"] != selected["variant"]


def test_the_checkpoint_key_follows_the_data_file_and_the_ddp_ranks(tmp_path):
    import os
    from types import SimpleNamespace

    from tune.objective import training_key

    data = tmp_path / "train.txt"
    data.write_text("to be or not to be\n")
    task = SimpleNamespace(name="charlm")

    def key(*extra):
        return training_key(task, _tiny.settings(tmp_path, f"task.data='{data}'", *extra), {"n_layer": 2})

    first = key()
    assert key() == first and key("tune.ddp_procs=2") != first
    data.write_text("that is the question\n")  # the file regenerated: the old checkpoints must not be reused
    os.utime(data, ns=(1, 1))
    assert key() != first


def test_trials_that_differ_only_in_compression_share_one_trained_checkpoint(tmp_path):
    # every training knob fixed: only quantize.mode and prune.ratio vary between trials
    space = _tiny.SPACE.rstrip("}") + ', "train.lr" = 3e-3}'
    settings = _tiny.settings(tmp_path, f"tune.space={space}", "tune.n_trials=3", "tune.early_stop.enabled=false")

    tune_run(settings, progress=False)

    tune_dir = RunDir(settings.run.root, "t").stage_dir("tune")
    trials = _tiny.journal_study(tune_dir).trials
    keys = {t.user_attrs["training_key"] for t in trials}
    inodes = {(tune_dir / f"trials/{t.number:04d}/model.pt").stat().st_ino for t in trials}
    assert len(keys) == 1 and len(inodes) == 1
    assert [bool(t.user_attrs.get("cache_hit")) for t in trials] == [False, True, True]
    assert not any("probe" in t.user_attrs for t in trials)  # without early stopping nothing reads a probe


def test_the_tune_command_refuses_an_unknown_model_setting_before_any_trial(tmp_path, capsys):
    code = cli(["tune", "--run", "bad", "--set", f"run.root='{tmp_path}'", "--set", "task.model.layers=3"])

    err = capsys.readouterr().err
    assert code == 2 and "unknown model setting(s) ['layers'] for task 'digits'" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "tune" / "trials").exists()


@pytest.mark.parametrize("bad", ['tune.space={"model.chanels" = 8}', "task.data='digits.csv'", "task.model.layers=3"])
def test_a_bad_config_is_refused_before_the_finished_study_is_invalidated(study_run, bad):
    from autoglm.config import load_settings
    from autoglm.errors import ConfigError

    settings, tune_dir, _ = study_run
    before = (tune_dir / "manifest.json").read_bytes(), (tune_dir / "selected.json").read_bytes()
    changed = load_settings(None, [*_tiny.overrides(tune_dir.parents[2], f"tune.n_trials={N_TRIALS}", run="e2e"),
                                   bad])

    with pytest.raises(ConfigError):
        tune_run(changed, progress=False)

    assert RunDir(settings.run.root, "e2e").state("tune") == "complete"
    assert ((tune_dir / "manifest.json").read_bytes(), (tune_dir / "selected.json").read_bytes()) == before
