"""Deploy's autoscaling capacity: the verified one a `loadtest --tune` wrote back, refused when measured on another
flavour or device kind than the overlay serves (unless told to use it), old loadtest manifests still read."""

from __future__ import annotations

import json

import pytest

from autoglm.artifacts import StageWriter, sha256_file, write_atomic
from autoglm.config import DeploySettings
from deploy import render_run
from deploy.__main__ import main
from deploy.capacity import serving_target
from tests.deploy.conftest import MODELS, complete_loadtest, publish_repository

VERIFIED = {"model": "digits-fp32", "max_queue_delay_us": 500, "preferred_batch_sizes": [8, 16], "instances": 1,
            "max_batch_size": 32, "max_queue_size": 0}
NATIVE_CPU = {"capacity_flavour": "native", "device_kind": "cpu", "host": "ci-host"}


def _render(published, **options):
    settings, _, keys = published
    deploy = settings.deploy.model_dump() | {"api_keys_file": keys, "kustomize": False} | options
    return render_run(settings.model_copy(update={"deploy": DeploySettings.model_validate(deploy)}))


def write_back(rundir, verified: dict, lineage: str | dict) -> None:
    """What `loadtest --tune` leaves after verifying ``verified`` (the issue-26 contract): the repository's config
    files, task.json's recommended model and a manifest whose config["triton"] holds the verified knobs and whose
    metrics["serving"] names the loadtest that chose them (``lineage``)."""
    repo, before = rundir.stage_dir("repository"), rundir.manifest("repository")
    info = json.loads((repo / "task.json").read_text())
    previous = {"triton": before.config["triton"], "recommended": info["recommended"]}
    info["recommended"] = verified["model"]
    write_atomic(repo / "task.json", (json.dumps(info, indent=2) + "\n").encode())
    knobs = {k: v for k, v in verified.items() if k != "model"}
    for name in MODELS.values():
        write_atomic(repo / "native" / name / "config.pbtxt",
                     f'name: "{name}"\ninstance_group [{{ count: {knobs["instances"]} kind: KIND_CPU }}]\n'.encode())
    writer = StageWriter(rundir, "repository", {"triton": before.config["triton"] | knobs}, inputs=["compress"])
    for path in sorted(p for p in repo.rglob("*") if p.is_file() and p.name != "manifest.json"):
        writer.add_output(str(path.relative_to(repo)))
    writer.manifest.metrics = before.metrics | {"recommended": verified["model"], "serving": {
        "source": "loadtest --tune", "loadtest": lineage, "previous": previous,
        "verified": verified, "written_at": "2026-12-06T09:00:00+00:00"}}
    writer.commit()


@pytest.mark.parametrize("order", ["loadtest first", "repository first"])
def test_deploy_takes_the_verified_capacity_that_loadtest_tune_wrote_back(published, order):
    """Either order: the loadtest manifest first and a lineage naming its sha256 (it is then stale by the rewrite),
    or the write-back first, naming the loadtest's report, and the loadtest manifest on the new repository."""
    settings, rundir, _ = published
    measured = {"capacity": 180.0, "recommended": VERIFIED, "mode": "tune", "instances": 1, **NATIVE_CPU}
    complete_loadtest(rundir, **measured)
    before = _render(published)  # the repository still serves the old config: not its capacity
    assert not before.metrics["capacity_measured"]
    assert "model digits-fp32 (deployed: digits-int8)" in before.metrics["capacity_source"]

    if order == "loadtest first":
        write_back(rundir, VERIFIED, sha256_file(rundir.manifest_path("loadtest")))
        assert rundir.state("loadtest") == "stale"  # only because the write-back rewrote the repository after it
    else:
        report = write_atomic(rundir.stage_dir("loadtest") / "report.json", b'{"mode": "tune"}\n')
        write_back(rundir, VERIFIED, {"report": "loadtest/report.json", "sha256": sha256_file(report)})
        complete_loadtest(rundir, outputs=("report.json",), **measured)
        assert rundir.state("loadtest") == "complete"
    manifest = _render(published)

    metrics = manifest.metrics
    assert metrics["capacity_measured"] and metrics["capacity_rps_per_instance"] == 180.0
    assert metrics["capacity_source"] == ("verified by `loadtest --tune` and written back: 180.0 req/s per instance "
                                          "at p95 41.5 ms on the native flavour, cpu (host ci-host)")
    assert metrics["recommended"] == "digits-fp32" and metrics["capacity_measured_on"] == NATIVE_CPU
    assert metrics["serving_target"] == {"env": "cpu", "model": "digits-fp32", "flavour": "native", "device": "cpu"}
    assert "loadtest/manifest.json" in manifest.inputs

    publish_repository(settings.run.root)  # compress again: a repository no loadtest chose
    assert "loadtest is stale" in _render(published).metrics["capacity_source"]


def test_a_capacity_measured_on_another_flavour_is_refused_naming_both_unless_used_anyway(published):
    settings, rundir, keys = published
    complete_loadtest(rundir, capacity=120.0, capacity_flavour="python", device_kind="cpu", host="laptop")

    refused = _render(published).metrics

    assert not refused["capacity_measured"] and refused["capacity_rps_per_instance"] == 50.0
    assert refused["capacity_source"] == (
        "default 50 req/s per instance (loadtest measured 120.0 req/s per instance at p95 41.5 ms on the python "
        "flavour, cpu (host laptop), but the cpu overlay serves digits-int8 on the native flavour, cpu: measure "
        "there, or set deploy.allow_capacity_mismatch=true (--use-capacity-anyway) to use it anyway)")
    used = _render(published, allow_capacity_mismatch=True).metrics
    assert used["capacity_measured"] and used["capacity_rps_per_instance"] == 120.0
    assert used["capacity_source"].endswith("the cpu overlay serves digits-int8 on the native flavour, cpu: used "
                                            "anyway (deploy.allow_capacity_mismatch)")
    assert used["capacity_measured_on"] == {"capacity_flavour": "python", "device_kind": "cpu", "host": "laptop"}
    common = ["--set", f"run.root='{settings.run.root}'", "--run", "rel", "--api-keys-file", str(keys),
              "--no-kustomize"]
    assert main(["render", *common]) == 0
    assert not rundir.manifest("deploy").metrics["capacity_measured"]
    assert main(["render", "--use-capacity-anyway", *common]) == 0
    assert rundir.manifest("deploy").metrics["capacity_measured"]


def test_a_capacity_measured_on_another_device_kind_is_refused(published):
    complete_loadtest(published[1], capacity=120.0, **NATIVE_CPU)
    assert _render(published).metrics["capacity_measured"]  # the cpu overlay: the same flavour and device
    gpu = _render(published, env="gpu").metrics
    assert not gpu["capacity_measured"]
    assert ("on the native flavour, cpu (host ci-host), but the gpu overlay serves digits-int8 on the native flavour, "
            "gpu") in gpu["capacity_source"]


def test_the_overlay_serves_a_model_on_the_device_its_instance_group_names(tmp_path):
    from autoglm.tasks import IOSpec, TensorSpec
    from autoglm.triton_config import InstanceGroup, ModelConfig, render_pbtxt

    io = IOSpec((TensorSpec("image", "float32", (1, 8, 8)),), (TensorSpec("logits", "float32", (10,)),))

    def config(model, text):
        write_atomic(tmp_path / "native" / model / "config.pbtxt", text.encode())

    for model, flavour, kind in (("onnx", "onnxruntime", "cpu"), ("plan", "tensorrt", "gpu")):  # as compress writes
        config(model, render_pbtxt(ModelConfig(name=model, io=io, flavour=flavour, max_batch_size=8,
                                               instance_group=InstanceGroup(2, kind))))
    config("auto", 'name: "auto"\n')
    assert serving_target(tmp_path, "onnx", "gpu").device == "cpu"  # ONNX Runtime on the CPU of a GPU pod
    assert serving_target(tmp_path, "plan", "cpu").device == "gpu"
    assert serving_target(tmp_path, "auto", "gpu").device == "gpu"  # Triton's choice: the pod's GPU
    assert serving_target(tmp_path, "auto", "cpu").device == "cpu"
    assert {serving_target(tmp_path, m, "cpu").flavour for m in ("onnx", "plan", "missing")} == {"native"}


@pytest.mark.parametrize(("record", "unknown"), [({}, "flavour and device kind"),
                                                  ({"device_kind": "cpu"}, "flavour")])
def test_an_older_loadtest_without_the_capacity_record_is_used_and_said_unchecked(published, record, unknown):
    complete_loadtest(published[1], capacity=120.0, **record)
    metrics = _render(published).metrics
    assert metrics["capacity_measured"] and metrics["capacity_rps_per_instance"] == 120.0
    assert metrics["capacity_source"].endswith(
        f"its {unknown} not recorded (an older loadtest): not checked against the cpu overlay")


def test_a_capacity_measured_at_another_instance_count_is_not_used(published):
    recommended = {"model": "digits-int8", "max_queue_delay_us": 0, "instances": 1}
    complete_loadtest(published[1], capacity=120.0, recommended=recommended, **NATIVE_CPU)
    metrics = _render(published).metrics  # the repository starts 2 instances per pod
    assert not metrics["capacity_measured"] and "instances 1 (deployed: 2)" in metrics["capacity_source"]
