"""One loadtest manifest per run with one record per workload: a run of one workload keeps the other's record and
report, a repository compress rewrote drops them, and a manifest older than the records still counts."""

from __future__ import annotations

import json

from autoglm.artifacts import StageWriter
from loadtest.records import earlier_records, keep_report, workload_of, workload_records
from tests.deploy.conftest import publish_repository


def _loadtest(rundir, metrics: dict, report: dict) -> None:
    """A loadtest run as the stage commits it: report.json, its kept copy, the records in the manifest."""
    earlier = earlier_records(rundir)
    writer = StageWriter(rundir, "loadtest", {"scenario": metrics["scenario"]}, inputs=["repository"])
    writer.invalidate()
    writer.dir.mkdir(parents=True, exist_ok=True)
    (writer.dir / "report.json").write_text(json.dumps(report))
    kept = keep_report(writer.dir, metrics["scenario"])
    for path in sorted(p for p in writer.dir.rglob("*") if p.is_file() and p.name != "manifest.json"):
        writer.add_output(str(path.relative_to(writer.dir)))
    writer.manifest.metrics = metrics | {"workloads": workload_records(earlier, metrics["scenario"], metrics, kept,
                                                                       "2026-12-06T12:00:00+00:00")}
    writer.commit()


def test_a_run_of_one_workload_keeps_the_others_record_and_report(tmp_path):
    rundir = publish_repository(tmp_path / "runs")
    _loadtest(rundir, {"scenario": "triton", "mode": "tune", "capacity_per_instance_rps": 2000.0}, {"n": 1})
    _loadtest(rundir, {"scenario": "generate", "mode": "tune", "capacity_per_instance_tps": 9000.0}, {"n": 2})

    metrics = rundir.manifest("loadtest").metrics
    records = metrics["workloads"]
    assert records["predict"]["capacity_per_instance_rps"] == 2000.0 and records["predict"]["scenario"] == "triton"
    assert records["generate"]["capacity_per_instance_tps"] == 9000.0
    assert records["predict"]["report"] == "reports/predict.json"
    loadtest = rundir.stage_dir("loadtest")
    assert json.loads((loadtest / "reports" / "predict.json").read_text()) == {"n": 1}
    assert json.loads((loadtest / "report.json").read_text()) == {"n": 2}  # the latest run's, as before
    assert "reports/predict.json" in rundir.manifest("loadtest").outputs and rundir.state("loadtest") == "complete"

    _loadtest(rundir, {"scenario": "triton", "mode": "sweep", "capacity_per_instance_rps": 1500.0}, {"n": 3})
    records = rundir.manifest("loadtest").metrics["workloads"]
    assert records["predict"]["mode"] == "sweep" and records["generate"]["capacity_per_instance_tps"] == 9000.0

    publish_repository(tmp_path / "runs")  # compress again: the records measured other models
    assert earlier_records(rundir) == {}


def test_a_manifest_older_than_the_records_is_the_record_of_its_scenario(tmp_path):
    rundir = publish_repository(tmp_path / "runs")
    writer = StageWriter(rundir, "loadtest", {}, inputs=["repository"])
    writer.manifest.metrics = {"scenario": "generate", "mode": "tune", "capacity_per_instance_tps": 7000.0}
    writer.commit()
    earlier = earlier_records(rundir)
    assert list(earlier) == ["generate"] and earlier["generate"]["capacity_per_instance_tps"] == 7000.0
    assert workload_of("triton") == workload_of("predict") == "predict" and workload_of("generate") == "generate"
