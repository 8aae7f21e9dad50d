"""``loadtest --tune --scenario generate`` against the real stack: a tiny charlm's generation model served by the
bundled Triton behind the gateway, its knobs changed live through model control (a reload), streams measured
by locust, the verified knobs written back into the repository and rolled back."""

import json
import shutil

import pytest

from autoglm.artifacts import RunDir
from autoglm.config import LoadtestTuneSettings
from loadtest.control import ModelControl, ServingConfig, model_parameters, serving_knobs
from loadtest.stage import loadtest_run

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]


@pytest.fixture
def lm_run(tmp_path):
    """A copy of the shared tiny charlm run (this test rewrites its repository)."""
    from tests.serve.fixtures import published_run, require_triton

    require_triton()
    shared = published_run("charlm")
    shutil.copytree(RunDir(shared.run.root, "charlm").path, tmp_path / "runs" / "charlm")
    return shared.model_copy(update={"run": shared.run.model_copy(update={"root": str(tmp_path / "runs")})})


def _generate_config(run: RunDir, flavour: str = "python") -> dict:
    from autoglm.triton_config import parse_pbtxt

    model = json.loads((run.stage_dir("repository") / "task.json").read_text())["generate"]
    msg = parse_pbtxt((run.stage_dir("repository") / flavour / model / "config.pbtxt").read_text())
    return {"parameters": {k: msg.parameters[k].string_value for k in ("max_sequences", "stream_interval_ms")},
            "instances": msg.instance_group[0].count, "versions": list(msg.version_policy.specific.versions)}


def test_generate_tune_changes_the_live_model_writes_the_verified_knobs_back_and_rollback_restores_them(lm_run):
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(lm_run)
    run = RunDir(settings.run.root, settings.run.name)
    before = _generate_config(run)
    tune = LoadtestTuneSettings(enabled=True, n_trials=2, sampler="grid", steps=1, step_s=1, verify_s=1,
                                verify_candidates=1, max_sequences=(3, 3), stream_interval_ms=(5, 5), instances=(1, 1))
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=64)) as serving:
        control = ModelControl(serving.triton_url)
        model = json.loads((run.stage_dir("repository") / "task.json").read_text())["generate"]
        # the baseline is what Triton serves now: a live config the repository does not hold
        control.apply(ServingConfig(model, parameters={"max_sequences": "6", "stream_interval_ms": "15"}),
                      control.config(model))
        options = settings.loadtest.model_copy(update={
            "scenario": "generate", "users": 4, "warmup_s": 0.3, "samples": 8, "generate_tokens": 8, "tune": tune,
            "slo_ttft_p95_ms": 5000, "slo_itl_p95_ms": 1000})
        manifest, code = loadtest_run(settings.model_copy(update={"loadtest": options}), force=True)

        report = json.loads((run.stage_dir("loadtest") / "report.json").read_text())
        trials = report["tune"]["trials"]
        assert code == 0 and len(trials) == 2 and trials[0]["baseline"]
        assert trials[0]["applied"]["parameters"] == {"max_sequences": "6", "stream_interval_ms": "15"}
        assert trials[1]["applied"]["parameters"] == {"max_sequences": "3", "stream_interval_ms": "5"}  # Triton's
        assert all(t["capacity_per_instance_tps"] > 0 and t["ttft_p95_ms"] > 0 and t["j_per_token"] > 0
                   for t in trials)
        assert all(s["tokens_per_s"] > 0 for t in trials for s in t["steps"])  # each step has its tokens
        assert report["tune"]["study"]["objectives"] == ["capacity_per_instance_tps", "j_per_token"]
        verified = manifest.metrics["recommended"]
        assert verified["model"] == model and manifest.metrics["capacity_per_instance_tps"] > 0
        assert verified["parameters"] in ({"max_sequences": "6", "stream_interval_ms": "15"},
                                          {"max_sequences": "3", "stream_interval_ms": "5"})
        # written back as a new version, and reloaded from it: Triton reports the verified knobs
        assert manifest.metrics["written_back"]["live"].startswith("reloaded")
        live = model_parameters(control.config(model))
        assert {k: live[k] for k in verified["parameters"]} == verified["parameters"]
        for flavour in ("python", "native"):
            written = _generate_config(run, flavour)
            assert written["parameters"] == verified["parameters"] and written["versions"] == [2]
        assert run.manifest("repository").config["generate"]["parameters"] == verified["parameters"]
        assert run.state("repository") == "complete" and run.state("loadtest") == "complete"

        from loadtest.__main__ import main

        assert main(["--run", settings.run.name, "--set", f"run.root='{settings.run.root}'", "--rollback"]) == 0
        assert _generate_config(run) == before and run.state("repository") == "complete"
        control.unload(model)
        control.load(model)  # from the rolled-back files
        assert model_parameters(control.config(model))["max_sequences"] == before["parameters"]["max_sequences"]
        assert serving_knobs(control.config(model))["instances"] == before["instances"]
