"""A tuning trial can train data-parallel: tune.ddp_procs=2 runs it under torchrun (gloo on CPU)."""

import json

import pytest

from tests.tune import _tiny
from tune.stage import tune_run

pytestmark = pytest.mark.slow


def test_a_trial_trains_under_torchrun_ddp_and_completes(tmp_path):
    settings = _tiny.settings(tmp_path, "tune.n_trials=1", "tune.ddp_procs=2", "run.threads=1",
                              "tune.early_stop.enabled=false", run="ddp")

    manifest = tune_run(settings, progress=False)

    trial_dir = tmp_path / "runs" / "ddp" / "tune" / "trials" / "0000"
    result = json.loads((trial_dir / "ddp" / "result.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["steps"] == 120  # the pinned train.max_steps of the tiny space
    assert (trial_dir / "model.pt").is_file()
    assert manifest.metrics["complete"] == 1 and 0.0 < manifest.metrics["selected_metric"] <= 1.0
    # the ranks trained, in torchrun's processes: the trial is charged their CPU time, not only its own
    compute = json.loads((tmp_path / "runs" / "ddp" / "tune" / "selected.json").read_text())["compute"]
    assert compute["cpu_s"] >= result["ranks_cpu_s"] > 0  # all of them, torch's imports included
    if compute["energy_method"].startswith("estimated"):  # from CPU time: the ranks' count
        assert compute["joules"] >= settings.measure.watts_per_core * result["ranks_cpu_s"]


def test_a_failed_ddp_trial_keeps_every_ranks_output_and_names_where(tmp_path, monkeypatch):
    import subprocess

    from autoglm import ddp
    from autoglm.errors import AutoGLMError

    rank_error = "[rank1]: RuntimeError: gloo connection closed"
    monkeypatch.setattr(ddp, "launch", lambda nproc, argv, **kw: subprocess.CompletedProcess(
        argv, 1, "ddp: starting", f"{rank_error}\n" + "torchrun summary\n" * 10))
    settings = _tiny.settings(tmp_path, "tune.n_trials=1", "tune.ddp_procs=2", "tune.early_stop.enabled=false",
                              run="ddp-fails")

    with pytest.raises(AutoGLMError, match="every rank's output: .*torchrun.log") as failed:
        tune_run(settings, progress=False)

    log = tmp_path / "runs" / "ddp-fails" / "tune" / "trials" / "0000" / "ddp" / "torchrun.log"
    assert rank_error not in str(failed.value) and rank_error in log.read_text()
    assert "ddp: starting" in log.read_text()
