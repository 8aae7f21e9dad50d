"""Run artifacts: atomic writes, manifests written last, tamper detection, skip and --force."""

import json

import pytest

from autoglm.artifacts import Manifest, RunDir, StageWriter, atomic_output, sha256_file, write_atomic
from autoglm.errors import AutoGLMError, IntegrityError


def _complete_stage(run, stage, config, inputs=(), payload=b"weights"):
    writer = StageWriter(run, stage, config, inputs=list(inputs))
    writer.invalidate()
    writer.path("model.bin").write_bytes(payload)
    writer.add_output("model.bin")
    writer.manifest.metrics = {"accuracy": 0.97}
    writer.add_energy("training", 12.5, "estimated:cpu-s×10W")
    return writer.commit()


def test_crash_mid_write_leaves_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, b'{"old": true}')
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b'{"half')
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_crash_before_commit_leaves_stage_incomplete_not_complete(tmp_path):
    run = RunDir(tmp_path, "r")
    _complete_stage(run, "train", {"lr": 1})
    writer = StageWriter(run, "train", {"lr": 2})
    writer.invalidate()  # a re-run starts
    writer.path("model.bin").write_bytes(b"half written")
    # ... and dies before commit()
    assert run.state("train") == "incomplete"


def test_manifest_records_outputs_energy_and_libraries(tmp_path):
    run = RunDir(tmp_path, "r")
    manifest = _complete_stage(run, "train", {"lr": 1})
    on_disk = json.loads(run.manifest_path("train").read_text())
    assert on_disk["outputs"]["model.bin"]["sha256"] == sha256_file(run.stage_dir("train") / "model.bin")
    assert on_disk["outputs"]["model.bin"]["size"] == len(b"weights")
    assert on_disk["energy"]["training"] == {"joules": 12.5, "method": "estimated:cpu-s×10W", "measured": False}
    assert "numpy" in on_disk["libraries"] and on_disk["schema_version"] == 1
    assert Manifest.load(run.manifest_path("train")).outputs == manifest.outputs


def test_tampered_output_is_detected_and_named(tmp_path):
    run = RunDir(tmp_path, "r")
    _complete_stage(run, "train", {"lr": 1})
    (run.stage_dir("train") / "model.bin").write_bytes(b"evil weights")
    assert run.state("train") == "tampered"
    with pytest.raises(IntegrityError, match="model.bin was modified"):
        StageWriter(run, "compress", {}, inputs=["train"])


def test_changed_parent_makes_child_stale(tmp_path):
    run = RunDir(tmp_path, "r")
    _complete_stage(run, "train", {"lr": 1})
    _complete_stage(run, "compress", {"q": "int8"}, inputs=["train"])
    assert run.state("compress") == "complete"
    _complete_stage(run, "train", {"lr": 2}, payload=b"new weights")
    assert run.state("compress") == "stale"


def test_skip_when_complete_and_redo_when_config_changes(tmp_path):
    run = RunDir(tmp_path, "r")
    _complete_stage(run, "train", {"lr": 1})
    assert StageWriter(run, "train", {"lr": 1}).up_to_date()
    assert not StageWriter(run, "train", {"lr": 2}).up_to_date()


def test_missing_parent_stage_names_the_command(tmp_path):
    with pytest.raises(AutoGLMError, match="autoglm train"):
        StageWriter(RunDir(tmp_path, "r"), "compress", {}, inputs=["train"])


def test_corrupt_manifest_is_reported(tmp_path):
    run = RunDir(tmp_path, "r")
    _complete_stage(run, "train", {"lr": 1})
    run.manifest_path("train").write_text("{not json")
    assert run.state("train") == "tampered"
    with pytest.raises(IntegrityError, match="--force"):
        run.manifest("train")


def test_unwritable_directory_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(AutoGLMError, match="cannot write"):
        write_atomic(blocker / "sub" / "manifest.json", b"{}")
