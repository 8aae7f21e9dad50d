"""``loadtest --tune --scenario generate`` against the real stack: a tiny charlm's generation model served by the
bundled Triton behind the gateway, its knobs changed live through model control (a reload), streams measured
by locust, the verified knobs written back into the repository and rolled back; and the whole path to deploy: a
``:predict`` and a ``:generate`` loadtest of one run, then ``autoglm deploy`` sizing the render by both figures."""

import json
import shutil

import pytest

from autoglm.artifacts import RunDir
from autoglm.config import LoadtestTuneSettings
from loadtest.control import ModelControl, ServingConfig, model_parameters, serving_knobs
from loadtest.stage import loadtest_run

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
# the shortest study: the baseline and one grid config (3 decode slots, 5 ms stream interval, the step's threads
# spinning), 1 s windows
TUNE = LoadtestTuneSettings(enabled=True, n_trials=2, sampler="grid", steps=1, step_s=1, verify_s=1,
                            verify_candidates=1, max_sequences=(3, 3), stream_interval_ms=(5, 5), instances=(1, 1),
                            intra_op_spinning=["run"])
BASELINE = {"max_sequences": "6", "stream_interval_ms": "15", "intra_op_spinning": "off"}
GRID = {"max_sequences": "3", "stream_interval_ms": "5", "intra_op_spinning": "run"}


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
    return {"parameters": {k: msg.parameters[k].string_value for k in BASELINE},
            "instances": msg.instance_group[0].count, "versions": list(msg.version_policy.specific.versions)}


def test_generate_tune_changes_the_live_model_writes_the_verified_knobs_back_and_rollback_restores_them(lm_run):
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(lm_run)
    run = RunDir(settings.run.root, settings.run.name)
    before = _generate_config(run)
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=64)) as serving:
        control = ModelControl(serving.triton_url)
        model = json.loads((run.stage_dir("repository") / "task.json").read_text())["generate"]
        # the baseline is what Triton serves now: a live config the repository does not hold
        control.apply(ServingConfig(model, parameters=BASELINE), control.config(model))
        options = settings.loadtest.model_copy(update={
            "scenario": "generate", "users": 4, "warmup_s": 0.3, "samples": 8, "generate_tokens": 8, "tune": TUNE,
            "slo_ttft_p95_ms": 5000, "slo_itl_p95_ms": 1000})
        manifest, code = loadtest_run(settings.model_copy(update={"loadtest": options}), force=True)

        report = json.loads((run.stage_dir("loadtest") / "report.json").read_text())
        trials = report["tune"]["trials"]
        assert code == 0 and len(trials) == 2 and trials[0]["baseline"]
        assert trials[0]["applied"]["parameters"] == BASELINE
        assert trials[1]["applied"]["parameters"] == GRID  # Triton's
        assert all(t["capacity_per_instance_tps"] > 0 and t["ttft_p95_ms"] > 0 and t["j_per_token"] > 0
                   for t in trials)
        assert all(s["tokens_per_s"] > 0 for t in trials for s in t["steps"])  # each step has its tokens
        assert report["tune"]["study"]["objectives"] == ["capacity_per_instance_tps", "j_per_token"]
        verified = manifest.metrics["recommended"]
        assert verified["model"] == model and manifest.metrics["capacity_per_instance_tps"] > 0
        assert verified["parameters"] in (BASELINE, GRID)
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


def test_predict_and_generate_loadtests_size_the_deploy_render_by_both_verified_figures(lm_run, tmp_path):
    import yaml

    from autoglm.autoscaling import rules_from
    from autoglm.triton_config import parse_pbtxt
    from deploy.__main__ import main as deploy
    from deploy.scaling import THROUGHPUT, TOKENS, quantity, threshold
    from loadtest.writeback import write_back
    from serve import GatewaySettings, on_free_ports, start_serving

    settings = on_free_ports(lm_run)
    run = RunDir(settings.run.root, settings.run.name)
    model = json.loads((run.stage_dir("repository") / "task.json").read_text())["generate"]
    with start_serving(settings, GatewaySettings(port=settings.serve.gateway_port, max_in_flight=64)):
        short = {"users": 2, "warmup_s": 0, "samples": 8, "overhead": False}
        predict = settings.loadtest.model_copy(update={"scenario": "task", "duration_s": 1, **short})
        _, predicted = loadtest_run(settings.model_copy(update={"loadtest": predict}), force=True, progress=False)
        generate = settings.loadtest.model_copy(update={
            "scenario": "generate", "generate_tokens": 8, "tune": TUNE, "slo_ttft_p95_ms": 5000, "slo_itl_p95_ms": 1000,
            **short, "users": 4})
        loadtest, generated = loadtest_run(settings.model_copy(update={"loadtest": generate}), force=True,
                                           progress=False)
    assert predicted == generated == 0
    records = loadtest.metrics["workloads"]
    assert set(records) == {"predict", "generate"}  # the generate run kept the predict run's record
    assert records["predict"]["mode"] == "single" and records["predict"]["capacity_per_instance_rps"] > 0
    assert records["generate"]["mode"] == "tune" and records["generate"]["capacity_per_instance_tps"] > 0
    assert loadtest.metrics["written_back"]["live"].startswith("reloaded")

    keys = tmp_path / "keys.txt"
    keys.write_text("ci:" + "ab" * 32 + "\n")
    where = ["--run", settings.run.name, "--set", f"run.root='{settings.run.root}'", "--api-keys-file", str(keys),
             "--no-kustomize", "--use-capacity-anyway"]  # measured on the bundled Triton's python flavour

    def render(*extra: str) -> tuple[dict, list[dict]]:
        assert deploy([*where, *extra]) == 0
        out = run.stage_dir("deploy") / "out" / "cpu" / "k8s" / "base"
        docs = [d for name in ("serving.yaml", "keda.yaml") if (out / name).is_file()
                for d in yaml.safe_load_all((out / name).read_text()) if d]
        return run.manifest("deploy").metrics, docs

    metrics, docs = render("--autoscaler", "hpa")
    generation, predict_rps = metrics["generation_capacity"], records["predict"]["capacity_per_instance_rps"]
    tps = records["generate"]["capacity_per_instance_tps"]
    assert generation["measured"] and generation["model"] == model
    assert generation["tokens_per_s_per_instance"] == tps  # taken from the verified :generate record
    assert generation["source"].startswith("verified by `loadtest --scenario generate --tune`")
    assert "used anyway (deploy.allow_capacity_mismatch)" in generation["source"]
    assert metrics["capacity_measured"] and metrics["capacity_rps_per_instance"] == predict_rps
    # per pod: capacity x instances / the autoscaling rule's up factor, for the requests and for the tokens
    up = rules_from().up_factor
    per_pod = {THROUGHPUT: predict_rps * run.manifest("repository").config["triton"]["instances"] / up,
               TOKENS: tps * generation["instances_per_pod"] / up}
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"]
               for m in _scaler(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert [targets[s.name] for s in per_pod] == [quantity(v) for v in per_pod.values()]

    _, docs = render("--autoscaler", "keda")
    triggers = {t["name"]: t["metadata"]["threshold"] for t in _scaler(docs, "ScaledObject")["spec"]["triggers"]}
    assert [triggers[s.name.removeprefix("autoglm_").replace("_", "-")] for s in per_pod] == \
        [threshold(v) for v in per_pod.values()]

    # the repository now serves other decode slots than the study verified: the token figure is refused, naming both
    serving = run.manifest("repository").metrics["serving"]
    verified = serving["verified"]
    write_back(run, {**verified, "parameters": {**verified["parameters"], "max_sequences": "5"}},
               {"loadtest": serving["loadtest"]})
    served = parse_pbtxt((run.stage_dir("repository") / "native" / model / "config.pbtxt").read_text())
    assert served.parameters["max_sequences"].string_value == "5"
    metrics, docs = render("--autoscaler", "hpa")
    refused = metrics["generation_capacity"]
    assert not refused["measured"] and refused["tokens_per_s_per_instance"] is None
    assert (f"loadtest measured {tps:.0f} tokens/s per instance on another config: max_sequences "
            f"{verified['parameters']['max_sequences']} (deployed: 5); write the `loadtest --tune` result back"
            ) in refused["source"]
    assert metrics["capacity_measured"]  # the predict figure still holds: its knobs did not change
    hpa = _scaler(docs, "HorizontalPodAutoscaler")
    assert TOKENS.name not in {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}


def _scaler(docs: list[dict], kind: str) -> dict:
    """Triton's autoscaler among the rendered objects (the gateway has an HPA of its own, on CPU)."""
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "autoglm-triton")
