"""A tune worker killed (SIGKILL) or stopped (SIGTERM, as Ctrl-C) in the middle of a trial, then resumed: nothing
completed is lost, and the trial it was running is retried in its own place."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoglm.artifacts import RunDir
from tests.tune import _tiny
from tune.stage import finished_by, tune_run

REPO = Path(__file__).resolve().parents[2]
N_TRIALS = 3
# long enough trials (a few seconds each) that the kill lands inside one; no compression siblings or portfolio
# entries, which would be queued ahead of the killed trial's retry and take the three trials' room
# (tests/tune/test_stage.py), and whose smaller models could finish the study before the kill lands
SLOW = ["tune.early_stop.enabled=false", "tune.compression_siblings=false", "tune.portfolio=off",
        f"tune.n_trials={N_TRIALS}",
        "tune.space=" + _tiny.SPACE.replace('"train.max_steps" = 120', '"train.max_steps" = 400')]


def _wait_for_a_trial_in_flight(tune_dir: Path, worker: subprocess.Popen, patience_s: float = 300):
    """Poll the journal, as another process would, until one trial is done and the next one is training."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) before a trial was in flight:\n"
                        f"{worker.stderr.read()}")
        if (tune_dir / "study.journal").is_file():
            try:
                trials = _tiny.journal_study(tune_dir).trials
            except KeyError:  # the study is not created yet
                trials = []
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING" and "training_key" in t.user_attrs]
            if done and running:
                return {t.number: t.values for t in done}, running[0].number
        time.sleep(0.2)
    worker.kill()
    pytest.fail("no trial was in flight in time")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_study_resumes_without_losing_completed_trials(tmp_path, stop):
    args = [f for o in _tiny.overrides(tmp_path, *SLOW, run="k") for f in ("--set", o)]
    tune_dir = tmp_path / "runs" / "k" / "tune"
    worker = subprocess.Popen([sys.executable, "-m", "tune", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    completed, killed = _wait_for_a_trial_in_flight(tune_dir, worker)

    os.kill(worker.pid, stop)
    _, err = worker.communicate()  # reaped: a zombie would still look alive to the stale-trial check
    if stop == signal.SIGTERM:  # stopped as by Ctrl-C: a one-line message, the trial failed as interrupted
        assert worker.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "Traceback" not in err
    tune_run(_tiny.settings(tmp_path, *SLOW, run="k"), progress=False)

    trials = {t.number: t for t in _tiny.journal_study(tune_dir).trials}
    finished = [t for t in trials.values() if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed]
    assert {n: trials[n].values for n in completed} == completed
    assert all(trials[n].state.name == "COMPLETE" for n in completed)
    assert trials[killed].state.name == "FAIL"
    assert len(retries) == 1 and retries[0].number > killed and retries[0].params == trials[killed].params
    assert retries[0].state.name == "COMPLETE"
    # the killed trial is finished (FAIL) but its retry takes its place: a kill costs none of the n_trials
    assert len(finished) == len(trials) == N_TRIALS + 1 and finished_by(list(trials.values()), None) == N_TRIALS
    assert RunDir(tmp_path / "runs", "k").state("tune") == "complete"


def test_failed_trials_say_why_and_do_not_count_so_a_rerun_after_the_fix_runs_them(tmp_path, monkeypatch):
    from autoglm.errors import AutoGLMError
    from tune.objective import Objective

    run_once = ["tune.n_trials=1", "tune.compression_siblings=false", "tune.early_stop.enabled=false"]
    real = Objective._run
    monkeypatch.setattr(Objective, "_run", lambda self, trial: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(AutoGLMError, match=r"1 of 1 failed \(trial 0: RuntimeError: disk full\); fix that and rerun"):
        tune_run(_tiny.settings(tmp_path, *run_once, run="f"), progress=False)

    monkeypatch.setattr(Objective, "_run", real)  # the cause fixed: the same command runs the trial it cost
    tune_run(_tiny.settings(tmp_path, *run_once, run="f"), progress=False)
    tune_dir = tmp_path / "runs" / "f" / "tune"
    assert [t.state.name for t in _tiny.journal_study(tune_dir).trials] == ["FAIL", "COMPLETE"]
    assert (tune_dir / "selected.json").is_file()

    # a rerun whose selection fails leaves no selection behind that a later stage could take for this run's
    with pytest.raises(AutoGLMError, match="no Pareto-optimal trial meets the selection constraints"):
        tune_run(_tiny.settings(tmp_path, *run_once, "tune.latency_slo_ms=1e-9", run="f"), progress=False)
    assert not any((tune_dir / f).exists() for f in ("selected.json", "pareto.json", "report.html"))
    assert RunDir(tmp_path / "runs", "f").state("tune") == "incomplete"
    assert len(_tiny.journal_study(tune_dir).trials) == 2  # the study itself is kept
