"""One loadtest manifest per run, and in it one record per workload, so runs do not lose each other's records.

A run's loadtest stage has one directory and one manifest, and every ``autoglm loadtest`` rewrites them. A charlm
run is measured twice, though: its predict model (``:predict``, the batching knobs) and its generation model
(``--scenario generate``, tokens/s); deploy sizes from both. So the manifest's ``metrics["workloads"]`` keeps the
latest record of each workload, carried over from the manifest a run replaces when that one was complete (it
measured the repository as it is now, or wrote it), and each workload's report is kept as
``reports/<workload>.json``. A repository compress rewrote since drops every carried record: they measured
other models. Tune studies keep their trial windows under ``tune/<study>/``, so two studies do not overwrite
each other's windows either.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from autoglm.artifacts import RunDir, sha256_file

WORKLOADS = ("predict", "generate")
# what deploy reads of a workload's record: the capacity, the config it was measured at and where, its usage
RECORD_KEYS = ("mode", "scenario", "slo", "gate_passed", "recommended", "capacity_rps", "capacity_per_instance_rps",
               "capacity_source", "instances", "p95_ms", "j_per_request", "energy_method", "peak_rss_mib",
               "capacity_flavour", "device_kind", "host", "capacity_tps", "capacity_per_instance_tps",
               "ttft_p95_ms", "itl_p95_ms", "j_per_token")


def workload_of(scenario: str) -> str:
    """The workload a loadtest scenario measures: the generation model's streams, or the predict models."""
    return "generate" if scenario == "generate" else "predict"


def earlier_records(run: RunDir) -> dict[str, dict[str, Any]]:
    """The workload records of the loadtest manifest a new run is about to replace, when it is complete (else
    none: a stale one measured a repository compress has rewritten since). A manifest written before records
    existed counts as the record of the workload it measured."""
    if run.state("loadtest") != "complete":
        return {}
    metrics = run.manifest("loadtest").metrics
    records = metrics.get("workloads")
    if isinstance(records, dict):
        return {k: v for k, v in records.items() if k in WORKLOADS and isinstance(v, dict)}
    if metrics.get("scenario") is None:
        return {}
    return {workload_of(metrics["scenario"]): {k: metrics.get(k) for k in RECORD_KEYS}}


def keep_report(stage_dir: Path, scenario: str) -> dict[str, str]:
    """Copy this run's ``report.json`` to ``reports/<workload>.json`` (the next run of another workload leaves it)."""
    kept = stage_dir / "reports" / f"{workload_of(scenario)}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stage_dir / "report.json", kept)
    return {"report": str(kept.relative_to(stage_dir)), "sha256": sha256_file(kept)}


def workload_records(earlier: dict[str, dict[str, Any]], scenario: str, metrics: dict[str, Any],
                     report: dict[str, str], measured_at: str) -> dict[str, dict[str, Any]]:
    """The manifest's records: the earlier ones, this run's workload replaced by what it measured now."""
    record = {k: metrics.get(k) for k in RECORD_KEYS} | report | {"measured_at": measured_at}
    return {**earlier, workload_of(scenario): record}
