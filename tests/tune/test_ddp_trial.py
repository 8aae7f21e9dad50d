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
