"""Compress publishes numbered versions: a new one beside the intact earlier ones, each with its lineage."""

import json

import pytest

from autoglm.artifacts import RunDir, StageWriter, verify_outputs
from autoglm.errors import ConfigError, IntegrityError
from autoglm.triton_config import parse_pbtxt
from autoglm.versions import check_version, load_lineage
from compress.recommend import Recommendation
from compress.repository import write_repository
from compress.variants import Variant


def publish(settings, run, tmp_path, content: bytes, variants=("fp32", "int8")):
    from autoglm.tasks import get_task

    made = []
    for name in variants:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content + name.encode())
        made.append(Variant(name, path))
    return write_repository(run, settings, get_task(settings), {}, made, Recommendation(variants[0], "test", None),
                            lineage={"stage": "tune", "trial": 7})


@pytest.fixture
def published(settings_in, tmp_path):
    settings = settings_in("run.name=v")
    run = RunDir(settings.run.root, "v")
    StageWriter(run, "compress", {}).commit()
    return settings, run


def test_a_second_publish_adds_version_2_and_keeps_version_1(published, tmp_path):
    settings, run = published
    publish(settings, run, tmp_path, b"first ")
    manifest = publish(settings, run, tmp_path, b"second ")
    repo = run.stage_dir("repository")

    assert manifest.metrics["version"] == 2
    for folder in ("python", "native"):
        model = repo / folder / "digits-fp32"
        assert (model / "1" / "model.onnx").read_bytes() == b"first fp32"
        assert (model / "2" / "model.onnx").read_bytes() == b"second fp32"
        assert list(parse_pbtxt((model / "config.pbtxt").read_text()).version_policy.specific.versions) == [2]
    lineage = manifest.metrics["lineage"]
    assert lineage == load_lineage(repo) and lineage["stable"] == 2
    entry = lineage["versions"]["2"]
    assert entry["source"] == "compress" and entry["trial"] == 7 and entry["run"] == "v" and entry["created"]
    assert entry["recommended"] == "digits-fp32" and entry["triton"]["instances"] == settings.compress.triton.instances
    assert set(entry["files"]) == {f"{f}/digits-{v}/2/{name}" for f in ("python", "native")
                                   for v in ("fp32", "int8") for name in ("model.onnx", "model.py")} - {
        f"native/digits-{v}/2/model.py" for v in ("fp32", "int8")}
    verify_outputs(repo, manifest)  # both versions' files are hashed in the manifest
    assert "python/digits-fp32/1/model.onnx" in manifest.outputs


def test_a_tampered_earlier_version_is_not_carried_and_cannot_be_released(published, tmp_path):
    settings, run = published
    publish(settings, run, tmp_path, b"first ")
    repo = run.stage_dir("repository")
    (repo / "python" / "digits-fp32" / "1" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="version 1 cannot be served: .*digits-fp32/1/model.onnx was modified"):
        check_version(repo, load_lineage(repo), 1)

    manifest = publish(settings, run, tmp_path, b"second ", variants=("fp32",))  # int8 no longer published

    assert sorted(manifest.metrics["lineage"]["versions"]) == ["2"]  # version 1 had a changed file
    assert not (repo / "python" / "digits-fp32" / "1").exists() and not (repo / "python" / "digits-int8").exists()
    assert manifest.metrics["version"] == 2  # numbers are never reused
    with pytest.raises(ConfigError, match="version 1 is not in this repository's lineage"):
        check_version(repo, load_lineage(repo), 1)
    assert json.loads((repo / "task.json").read_text())["models"] == {"fp32": "digits-fp32"}
