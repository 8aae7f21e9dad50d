"""Against the real stack: a Triton started here (plus the gateway), locust headless, the SLO gate as an exit
code, and a sweep that reconfigures the live Triton and sees the dynamic batcher respond."""

import csv
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from autoglm.artifacts import RunDir
from loadtest.control import ModelControl, serving_knobs
from autoglm.config import LoadtestTuneSettings, SweepGrid
from loadtest.stage import loadtest_run

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]

TINY = ["train.max_steps=60", "train.eval_every=60", "train.batch_size=64", "train.eval_batches=2",
        "task.model={channels=8, hidden=32, dropout=0.0}", "measure.repeats=3", "measure.warmup=1",
        "measure.batch_sizes=[1]", "compress.exporter='legacy'", "compress.variants=['fp32','int8']",
        "compress.max_metric_loss=1.0", "compress.quantize.calibration_batches=2"]


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    """A run with a tiny digits model compressed into a Triton repository (fp32 and int8)."""
    from autoglm.config import load_settings
    from autoglm.train import train_run
    from compress.stage import compress_run
    from tests.serve.fixtures import require_triton

    require_triton()
    root = tmp_path_factory.mktemp("loadtest")
    settings = load_settings(None, [f"run.root='{root / 'runs'}'", f"run.cache_dir='{root / 'cache'}'",
                                    "run.name=rel", *TINY])
    train_run(settings, progress=False)
    compress_run(settings, progress=False)
    return settings


def _gateway(repository: Path, triton_url: str, workdir: Path):
    """The gateway in its own uvicorn process, as ``autoglm serve`` runs it; (None, why) where it is not built."""
    try:
        from serve.settings import GatewaySettings
        from serve.supervisor import GatewayProcess
        from serve.triton import free_port
    except ImportError as exc:
        return None, f"serve's gateway process is not importable ({exc})"
    settings = GatewaySettings(port=free_port(), triton_url=triton_url, repository=repository)
    gateway = GatewayProcess(settings, workdir / "gateway").start(timeout_s=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # healthy is not ready: the models must answer too
        try:
            with urllib.request.urlopen(f"{gateway.url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return gateway, gateway.url
        except OSError:
            time.sleep(0.2)
    gateway.stop()
    raise RuntimeError(f"the gateway never became ready: see {gateway.log_path}")


@pytest.fixture(scope="module")
def stack(release_run, tmp_path_factory):
    """Triton serving the run's python-flavour repository, and the gateway in front when it exists."""
    from serve.triton import TritonServer, free_ports

    run = RunDir(release_run.run.root, release_run.run.name)
    work = tmp_path_factory.mktemp("stack")
    http, grpc, metrics = free_ports(3)
    triton = TritonServer(run.stage_dir("repository") / "python", workdir=work, http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    with triton.start(timeout_s=90):
        gateway, gateway_url = _gateway(run.stage_dir("repository"), triton.http_url, work)
        try:
            yield {"triton": triton, "gateway_url": gateway_url if gateway else None,
                   "no_gateway": None if gateway else gateway_url}
        finally:
            if gateway:
                gateway.stop()  # before Triton: its shutdown waits for open client connections


def _stubs(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _with(settings, stack=None, **loadtest):
    """``settings`` with these ``loadtest`` values (and, given the stack, its URLs)."""
    if stack is not None:
        triton = stack["triton"]
        loadtest = {"target": stack["gateway_url"] or triton.http_url, "triton_url": triton.http_url,
                    "metrics_url": triton.metrics_url, "warmup_s": 0.5, **loadtest}
    return settings.model_copy(update={"loadtest": settings.loadtest.model_copy(update=loadtest)})


def test_ten_second_run_writes_csvs_report_and_release_page(release_run, stack):
    scenario = "task" if stack["gateway_url"] else "triton"  # without a gateway: the same v2 protocol, direct
    settings = _with(release_run, stack, users=4, duration_s=10, scenario=scenario, overhead=False)

    manifest, code = loadtest_run(settings, force=True)

    run = RunDir(settings.run.root, settings.run.name)
    out = run.stage_dir("loadtest")
    report = json.loads((out / "report.json").read_text())
    point = report["points"][0]
    assert code == 0 and report["gate"]["passed"] and run.state("loadtest") == "complete"
    assert point["scenario"] == scenario and point["window"]["requests"] > 0 and point["window"]["failures"] == 0
    assert point["window"]["seconds"] == pytest.approx(10, abs=1.5)
    with open(out / "points" / "p00" / "locust_stats.csv", newline="") as fh:
        aggregated = list(csv.DictReader(fh))[-1]
    assert aggregated["Name"] == "Aggregated" and int(aggregated["Request Count"]) > 0
    assert int(aggregated["Failure Count"]) == 0
    assert (out / "points.csv").read_text().count("\n") == 2 and (out / "tradeoff.png").stat().st_size > 10_000
    energy = point["energy"]
    assert energy["method"].startswith("estimated") or energy["measured"]  # labelled either way
    assert energy["j_per_request"] > 0 and stack["triton"].pid in energy["pids"]
    if stack["gateway_url"]:  # the gateway's CPU counts too: it is part of the service
        assert set(energy["pids"]) - {stack["triton"].pid} - set(_stubs(stack["triton"].pid))
    assert point["triton"]["valid"] and point["triton"]["requests"] > 0 and point["triton"]["mean_batch"] >= 1
    assert manifest.metrics["capacity_rps"] > 0 and manifest.metrics["energy_method"] == energy["method"]
    memory = point["memory"]  # Triton's processes only (what its container holds), for deploy's memory request
    assert set(memory["pids"]) == {stack["triton"].pid, *_stubs(stack["triton"].pid)} and memory["samples"] >= 2
    assert manifest.metrics["peak_rss_mib"] == memory["peak_rss_mib"] > 50
    page = (run.path / "report.html").read_text()
    assert "Serving: 1 operating point" in page and "Compression: 3 variants" in page


@pytest.mark.parametrize(("change", "message"), [
    ({"model": "nope"}, "nope"),
    ({"target": "http://127.0.0.1:9"}, "nothing answers at http://127.0.0.1:9"),
    ({"target": "http://127.0.0.1:abc"}, r"is not an http\(s\) URL with a host and port"),
    ({"scenario": "triton", "triton_url": "http://127.0.0.1:9", "tune": LoadtestTuneSettings(enabled=True)},
     "nothing answers at http://127.0.0.1:9"),
])
def test_a_bad_model_or_target_is_refused_and_the_last_measurement_kept(release_run, stack, change, message):
    from autoglm.errors import AutoGLMError

    run = RunDir(release_run.run.root, release_run.run.name)
    if run.state("loadtest") != "complete":  # the measurement a typo must not cost
        loadtest_run(_with(release_run, stack, users=2, duration_s=3, overhead=False), force=True)
    before = run.manifest_path("loadtest").read_bytes()

    with pytest.raises(AutoGLMError, match=message):
        loadtest_run(_with(release_run, stack, overhead=False, **change), force=True)

    assert run.state("loadtest") == "complete" and run.manifest_path("loadtest").read_bytes() == before


def test_a_gateway_with_api_keys_is_loaded_with_the_configured_key(release_run, stack, tmp_path):
    from pydantic import SecretStr

    from autoglm.gateway_spec import ApiKey, hash_api_key
    from serve.settings import GatewaySettings
    from serve.supervisor import GatewayProcess
    from serve.triton import free_port

    if not stack["gateway_url"]:
        pytest.skip(stack["no_gateway"])
    run = RunDir(release_run.run.root, release_run.run.name)
    key = ApiKey(name="ci", sha256=hash_api_key("s3"))
    keyed = GatewaySettings(port=free_port(), triton_url=stack["triton"].http_url,
                            repository=run.stage_dir("repository"), api_keys=[key])
    gateway = GatewayProcess(keyed, tmp_path / "keyed").start(timeout_s=60)
    try:
        settings = _with(release_run, stack, users=2, duration_s=3, overhead=False, target=gateway.url,
                         api_key=SecretStr("s3"))
        _, code = loadtest_run(settings, force=True)
    finally:
        gateway.stop()

    point = json.loads((run.stage_dir("loadtest") / "report.json").read_text())["points"][0]
    assert code == 0 and point["window"]["requests"] > 0 and point["window"]["failures"] == 0
    assert '"api_key": "**********"' in run.manifest_path("loadtest").read_text()  # recorded masked


def test_gateway_overhead_is_measured_against_triton_direct(release_run, stack):
    if not stack["gateway_url"]:
        pytest.skip(f"no gateway to measure: {stack['no_gateway']}")
    settings = _with(release_run, stack, users=4, duration_s=3, scenario="v2")
    _, code = loadtest_run(settings, force=True)
    report = json.loads((RunDir(settings.run.root, "rel").stage_dir("loadtest") / "report.json").read_text())
    overhead = report["overhead"]
    assert code == 0 and overhead["gateway"]["requests"] > 0 and overhead["direct"]["requests"] > 0
    assert overhead["gateway"]["failures"] == overhead["direct"]["failures"] == 0
    assert overhead["throughput_ratio"] > 0 and "Triton-direct throughput" in overhead["summary"]


def test_slo_gate_exits_non_zero_on_an_impossible_slo(release_run, stack):
    triton = stack["triton"]
    cmd = [sys.executable, "-m", "loadtest", "--run", "rel", "--set", f"run.root='{release_run.run.root}'",
           "--set", f"run.cache_dir='{release_run.run.cache_dir}'", "--scenario", "triton", "--triton-url",
           triton.http_url, "--metrics-url", triton.metrics_url, "--users", "2", "--duration", "2", "--warmup", "0",
           "--slo-p95-ms", "0.001", "--no-overhead", "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SLO gate FAILED" in done.stdout and "> SLO 0.001 ms" in done.stdout
    manifest = RunDir(release_run.run.root, "rel").manifest("loadtest")
    assert manifest.metrics["gate_passed"] is False and "p95" in manifest.metrics["gate_reasons"][0]


def test_sweep_reconfigures_live_triton_and_batches_follow_the_queue_delay(release_run, stack):
    triton = stack["triton"]
    model = json.loads((RunDir(release_run.run.root, "rel").stage_dir("repository") / "task.json").read_text())[
        "recommended"]
    control = ModelControl(triton.http_url)
    before = serving_knobs(control.config(model))
    started = triton.pid
    # An unbounded queue: Triton 2.51 stalls for ~500 ms at a time under any queue bound (see control.py).
    grid = SweepGrid(max_queue_delay_us=[0, 20000], instances=[1], max_queue_size=[0], users=[16], window_s=3)

    manifest, code = loadtest_run(_with(release_run, stack, scenario="triton", sweep=True, grid=grid, overhead=False),
                                  force=True)

    report = json.loads((RunDir(release_run.run.root, "rel").stage_dir("loadtest") / "report.json").read_text())
    applied = [p["applied"]["applied"]["max_queue_delay_us"] for p in report["points"]]
    batches = [p["triton"]["mean_batch"] for p in report["points"]]
    print(f"\nmean batch at delay 0 / 20000 µs, 16 users: {batches[0]:.2f} / {batches[1]:.2f}")
    assert code == 0 and applied == [0, 20000] and triton.pid == started  # live: the same server process
    assert all(p["window"]["failures"] == 0 and p["triton"]["valid"] for p in report["points"])
    assert batches[1] > 4 and batches[1] > 1.5 * batches[0]
    assert serving_knobs(control.config(model)) == before  # the sweep put the model back as it found it
    assert manifest.metrics["capacity_per_instance_rps"] > 0 and manifest.metrics["recommended"]["model"] == model
    assert set(manifest.metrics["front"]) <= {"p00", "p01"} and manifest.metrics["front"]


def _tuning(settings, stack, **tune):
    """``settings`` for a short --tune study straight to Triton (by default a 2-step ladder of 1 s steps)."""
    options = {"enabled": True, "steps": 2, "step_s": 1, "verify_s": 1, **tune}
    return _with(settings, stack, scenario="triton", overhead=False, users=4, tune=LoadtestTuneSettings(**options))


def _repository_files(run):
    """The served files: not the records of what happened (manifest, lineage)."""
    repo = run.stage_dir("repository")
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "versions.json")}


def test_tune_changes_the_live_config_writes_the_verified_one_back_and_rollback_restores_it(release_run, stack,
                                                                                           tmp_path):
    from loadtest.control import ServingConfig
    from serve.triton import TritonServer, free_ports

    triton, run = stack["triton"], RunDir(release_run.run.root, "rel")
    control = ModelControl(triton.http_url)
    model = json.loads((run.stage_dir("repository") / "task.json").read_text())["recommended"]
    # the baseline is what Triton serves now: a live config the repository does not hold
    control.apply(ServingConfig(model, 1500, (4,), 1, 0, 32), control.config(model))
    before, started = _repository_files(run), triton.pid
    # a grid of one config besides the baseline: int8, max batch 16, no preferred sizes, 500 µs
    settings = _tuning(release_run, stack, n_trials=2, sampler="grid", variants=["int8"], max_batch_size=(16, 16),
                       preferred_batch_sizes=[[]], max_queue_delay_us=(500, 500), instances=(1, 1))
    try:
        manifest, code = loadtest_run(_with(settings, slo_p95_ms=1000), force=True)

        report = json.loads((run.stage_dir("loadtest") / "report.json").read_text())
        trials = report["tune"]["trials"]
        assert code == 0 and triton.pid == started and len(trials) == 2  # live: the same server process
        assert trials[0]["baseline"] and trials[0]["applied"]["max_queue_delay_us"] == 1500
        assert trials[1]["applied"] == {"max_queue_delay_us": 500, "preferred_batch_sizes": [16], "instances": 1,
                                        "max_queue_size": 0, "max_batch_size": 16}  # what Triton reported
        assert all(t["mean_batch"] >= 1 and t["j_per_request"] > 0 for t in trials)
        assert (run.stage_dir("loadtest") / "tune" / "study.journal").stat().st_size > 0
        verified = manifest.metrics["recommended"]
        assert verified["max_queue_delay_us"] in (1500, 500) and manifest.metrics["capacity_per_instance_rps"] > 0
        assert manifest.metrics["capacity_flavour"] == "python" and manifest.metrics["device_kind"] == "cpu"
        assert run.state("repository") == "complete" and run.state("loadtest") == "complete"
        serving = run.manifest("repository").metrics["serving"]
        assert serving["verified"]["model"] == verified["model"] and serving["previous"]["recommended"] == model

        http, grpc, metrics = free_ports(3)
        restarted = TritonServer(run.stage_dir("repository") / "python", workdir=tmp_path, http_port=http,
                                 grpc_port=grpc, metrics_port=metrics)
        with restarted.start(timeout_s=90):  # what `autoglm serve` starts from the written repository
            fresh = ModelControl(restarted.http_url)
            served = serving_knobs(fresh.config(verified["model"]))
            assert {k: served[k] for k in ("max_queue_delay_us", "max_batch_size", "instances")} == \
                {k: verified[k] for k in ("max_queue_delay_us", "max_batch_size", "instances")}

            from loadtest.__main__ import main

            assert main(["--run", "rel", "--set", f"run.root='{release_run.run.root}'", "--rollback"]) == 0

            after = _repository_files(run)  # the written-back version stays in the lineage, no longer served
            assert {k: v for k, v in after.items() if k in before} == before and run.state("repository") == "complete"
            assert {rel.split("/")[2] for rel in set(after) - set(before)} == {str(serving["version"])}
            fresh.unload(verified["model"])
            fresh.load(verified["model"])  # from the rolled-back files
            assert serving_knobs(fresh.config(verified["model"]))["max_queue_delay_us"] == 0
    finally:
        models = json.loads((run.stage_dir("repository") / "task.json").read_text())["models"]
        for name in set(models.values()):
            if control.ready(name):  # the stack back on the repository's own config for the other tests
                control.unload(name)
                control.load(name)


def test_tune_with_an_slo_no_config_meets_writes_the_study_and_report_exits_1_and_leaves_the_repository(
        release_run, stack):
    run = RunDir(release_run.run.root, "rel")
    before = run.manifest_path("repository").read_bytes()

    settings = _tuning(release_run, stack, n_trials=1, variants=[], steps=1, users=2)  # one 1 s step
    manifest, code = loadtest_run(_with(settings, slo_p95_ms=0.001), force=True)

    report = json.loads((run.stage_dir("loadtest") / "report.json").read_text())
    assert code == 1 and not report["gate"]["passed"]
    assert "no serving config held the SLO" in report["gate"]["reasons"][0]
    assert report["tune"]["study"]["measured"] == 1 and report["tune"]["verified"] is None
    assert (run.stage_dir("loadtest") / report["tune"]["study"]["journal"]).is_file()
    assert manifest.metrics["gate_passed"] is False and manifest.metrics["written_back"] is None
    assert run.manifest_path("repository").read_bytes() == before
