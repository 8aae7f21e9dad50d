"""Write-back of a verified serving config into a repository compress wrote, its rollback, and capacity records."""

import json

import pytest

from autoglm.artifacts import RunDir, StageWriter, sha256_file
from autoglm.errors import AutoGLMError
from autoglm.triton_config import parse_pbtxt
from compress.repository import write_repository
from compress.variants import Variant
from loadtest.writeback import SOURCE, capacity_record, rollback, write_back

VERIFIED = {"model": "digits-int8", "max_batch_size": 16, "max_queue_delay_us": 1500,
            "preferred_batch_sizes": [4], "instances": 2, "max_queue_size": 0}
LINEAGE = {"loadtest": {"report": "loadtest/report.json", "sha256": "ab" * 32}}
OWN = ("manifest.json", "versions.json")  # the record of what happened, not the served files


@pytest.fixture
def run(settings_in, tmp_path):
    """A repository written by compress itself (fp32 and int8 of digits; the model files are stand-ins)."""
    from autoglm.tasks import get_task

    settings = settings_in("run.name=wb")
    run = RunDir(settings.run.root, "wb")
    StageWriter(run, "compress", {}).commit()
    variants = []
    for name in ("fp32", "int8"):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(name.encode())
        variants.append(Variant(name, path))
    write_repository(run, settings, get_task(settings), {}, variants, _recommended("fp32"))
    return run


def _recommended(variant: str):
    """What write_repository takes for the recommended variant: a Recommendation where compress keeps its
    evidence (compress.recommend), else the variant's name."""
    try:
        from compress.recommend import Recommendation
    except ImportError:
        return variant
    return Recommendation(variant, "chosen by the test", None)


def _files(run):
    repo = run.stage_dir("repository")
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def test_write_back_regenerates_every_config_and_keeps_the_repository_complete(run):
    before = _files(run)

    record = write_back(run, VERIFIED, LINEAGE)

    repo = run.stage_dir("repository")
    manifest = run.manifest("repository")
    assert run.state("repository") == "complete"  # the new hashes are in the manifest
    assert sorted(record["changed"]) == sorted([f"{f}/digits-{v}/config.pbtxt" for f in ("python", "native")
                                                for v in ("fp32", "int8")] + ["task.json", "versions.json"])
    for flavour in ("python", "native"):
        cfg = parse_pbtxt((repo / flavour / "digits-fp32" / "config.pbtxt").read_text())
        assert list(cfg.version_policy.specific.versions) == [2]  # a new version, served in place of 1
        assert (repo / flavour / "digits-fp32" / "2" / "model.onnx").read_bytes() == b"fp32"
        assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1500 and cfg.instance_group[0].count == 2
    info = json.loads((repo / "task.json").read_text())
    assert info["recommended"] == "digits-int8"
    assert info["recommendation"]["variant"] == "fp32"  # compress's reasoning is kept, and says what serves now
    assert info["recommendation"]["served"] == {"model": "digits-int8", "source": SOURCE}
    assert manifest.config["triton"] | {"intra_op_threads": 1} == {
        "max_batch_size": 16, "max_queue_delay_us": 1500, "preferred_batch_sizes": [4], "instances": 2,
        "max_queue_size": 0, "intra_op_threads": 1}
    serving = manifest.metrics["serving"]
    assert serving["source"] == SOURCE and serving["loadtest"] == LINEAGE["loadtest"]
    assert serving["previous"]["recommended"] == "digits-fp32" and serving["previous"]["triton"]["instances"] == 1
    assert manifest.metrics["recommended"] == "digits-int8"
    lineage = manifest.metrics["lineage"]
    assert lineage["stable"] == 2 and lineage["versions"]["2"]["parent"] == 1
    assert lineage["versions"]["2"]["source"] == SOURCE and lineage["versions"]["2"]["loadtest"] == LINEAGE["loadtest"]
    assert lineage["versions"]["2"]["triton"]["instances"] == 2 and lineage["versions"]["1"]["source"] == "compress"
    unchanged = set(before) - set(record["changed"]) - {"manifest.json"}
    assert all(_files(run)[rel] == before[rel] for rel in unchanged)  # the model files are untouched


def test_rollback_restores_the_files_byte_for_byte_once(run):
    before = _files(run)
    write_back(run, {**VERIFIED, "preferred_batch_sizes": [16]}, LINEAGE)  # [max batch]: written as []
    assert run.manifest("repository").config["triton"]["preferred_batch_sizes"] == []

    record = rollback(run)

    after = _files(run)
    assert {rel: data for rel, data in after.items() if rel in before and rel not in OWN} == \
        {rel: data for rel, data in before.items() if rel not in OWN}
    assert {rel for rel in set(after) - set(before)} == {rel for rel in after if "/2/" in rel}  # kept, not served
    manifest = run.manifest("repository")
    assert manifest.metrics["lineage"]["stable"] == 1
    assert manifest.metrics["lineage"]["history"][-1] | {"at": None} == {
        "version": 1, "by": "loadtest --rollback", "at": None, "rolled_back": 2}
    assert run.state("repository") == "complete" and manifest.metrics["recommended"] == "digits-fp32"
    assert manifest.metrics["serving"]["source"] == "loadtest --rollback" and record["rolled_back"]["instances"] == 2
    with pytest.raises(AutoGLMError, match="rolled back already"):
        rollback(run)


def test_the_same_config_written_back_twice_still_rolls_back_to_compress_own(run):
    before = _files(run)
    write_back(run, VERIFIED, LINEAGE)
    again = write_back(run, VERIFIED, LINEAGE)

    assert again["changed"] == [] and again["previous"]["recommended"] == "digits-fp32"
    rollback(run)
    assert {k: v for k, v in _files(run).items() if k in before and k not in OWN} == \
        {k: v for k, v in before.items() if k not in OWN}


def test_nothing_to_roll_back_in_a_repository_compress_wrote(run):
    with pytest.raises(AutoGLMError, match="its config is compress's own"):
        rollback(run)


def test_a_repository_that_its_manifest_does_not_regenerate_is_refused_and_left_alone(run):
    path = run.manifest_path("repository")
    manifest = json.loads(path.read_text())
    manifest["config"]["triton"]["max_queue_delay_us"] = 100  # the files say 0
    path.write_text(json.dumps(manifest))
    before = _files(run)

    with pytest.raises(AutoGLMError, match="does not hold the serving knobs.*re-run `autoglm compress --force`"):
        write_back(run, VERIFIED, LINEAGE)

    assert _files(run) == before


def test_an_impossible_verified_config_writes_nothing(run):
    before = sha256_file(run.manifest_path("repository"))
    with pytest.raises(AutoGLMError, match="cannot be written"):
        write_back(run, {**VERIFIED, "preferred_batch_sizes": [32]}, LINEAGE)  # above max_batch_size 16
    assert sha256_file(run.manifest_path("repository")) == before


@pytest.mark.parametrize(("live", "flavour", "kind"), [
    ({"backend": "python", "instance_group": [{"kind": "KIND_CPU"}]}, "python", "cpu"),
    ({"platform": "onnxruntime_onnx", "instance_group": [{"kind": "KIND_CPU"}]}, "native", "cpu"),
    ({"platform": "tensorrt_plan", "instance_group": [{"kind": "KIND_GPU", "count": 1}]}, "native", "gpu"),
    (None, "native", "cpu"),  # Triton unreachable: what serve was told
])
def test_capacity_records_name_the_flavour_device_kind_and_host(settings_in, live, flavour, kind):
    import socket

    settings = settings_in("serve.flavour='native'")
    record = capacity_record(settings, live)
    assert record == {"capacity_flavour": flavour, "device_kind": kind, "host": socket.gethostname()}
    remote = settings_in("loadtest.triton_url='http://triton.example:8000'")
    assert capacity_record(remote, live)["host"] == "triton.example"
