"""The served Pareto front, capacities per serving config and the recommendation under the SLO."""

import pytest

from loadtest.front import capacities, pareto_front, point_row, recommend
from loadtest.latency import Slo

SLO = Slo(p95_ms=20, error_rate=0.01)


def row(id, rps, p95, j=0.01, model="m-fp32", delay=0, instances=1, users=8, errors=0.0, method="estimated:cpu-s×10W",
        queue=None):
    return {"id": id, "scenario": "task", "model": model, "max_queue_delay_us": delay, "preferred_batch_sizes": None,
            "instances": instances, "max_queue_size": queue, "users": users, "requests": 1000,
            "failures": int(errors * 1000), "rps": rps, "p50_ms": p95 / 2, "p95_ms": p95, "p99_ms": p95 * 2,
            "error_rate": errors, "j_per_request": j, "energy_method": method, "mean_batch": 1.0,
            "mean_queue_us": 10.0, "mean_compute_us": 100.0, "passed": True}


def test_front_keeps_only_non_dominated_points():
    rows = [row("fast", rps=500, p95=2, j=0.02), row("frugal", rps=600, p95=9, j=0.005),
            row("busy", rps=1500, p95=15, j=0.01), row("worse", rps=400, p95=10, j=0.03)]
    assert pareto_front(rows) == ["fast", "frugal", "busy"]


def test_front_without_energy_uses_latency_and_throughput():
    rows = [row("a", 500, 2, j=None), row("b", 900, 5, j=None), row("c", 800, 6, j=None)]
    assert pareto_front(rows) == ["a", "b"]


def test_front_refuses_to_compare_measured_with_estimated_energy():
    rows = [row("a", 500, 2, method="rapl"), row("b", 900, 5)]
    with pytest.raises(ValueError, match="measured and estimated"):
        pareto_front(rows)


def test_front_skips_windows_without_requests():
    empty = {**row("empty", 0, 1), "requests": 0, "p95_ms": None}
    assert pareto_front([empty, row("a", 10, 3)]) == ["a"]


def test_capacity_is_the_best_throughput_within_the_slo_per_config():
    rows = [row("c1", 300, 3, users=1), row("c8", 1200, 12, users=8), row("c32", 1600, 45, users=32),
            row("d8", 900, 8, delay=2000), row("d32", 1000, 30, delay=2000, errors=0.05)]
    by_delay = {c["config"]["max_queue_delay_us"]: c for c in capacities(rows, SLO)}
    assert by_delay[0]["point"] == "c8" and by_delay[0]["capacity_rps"] == 1200  # c32 misses the p95 SLO
    assert by_delay[2000]["point"] == "d8" and by_delay[2000]["points"] == ["d8", "d32"]


def test_recommendation_is_highest_throughput_per_instance():
    rows = [row("one", 1000, 10, instances=1), row("two", 1500, 10, instances=2)]
    chosen = recommend(rows, SLO)
    assert chosen["point"] == "one" and chosen["capacity_per_instance_rps"] == 1000
    assert chosen["config"] == {"model": "m-fp32", "max_queue_delay_us": 0, "preferred_batch_sizes": None,
                                "instances": 1, "max_queue_size": None, "max_batch_size": None}
    assert "per instance" in chosen["why"]


def test_near_ties_go_to_the_lower_energy_per_request():
    rows = [row("hot", 1000, 10, j=0.02), row("cool", 980, 12, j=0.01, delay=500)]
    chosen = recommend(rows, SLO)
    assert chosen["point"] == "cool" and "lowest J/request" in chosen["why"]


def test_no_recommendation_when_nothing_meets_the_slo():
    assert recommend([row("slow", 1000, 50), row("flaky", 500, 5, errors=0.2)], SLO) is None


def test_point_row_flattens_a_joined_window():
    point = {"id": "p03", "scenario": "triton", "model": "m-int8", "users": 16,
             "config": {"model": "m-int8", "max_queue_delay_us": 2000, "preferred_batch_sizes": [8, 16],
                        "instances": 2, "max_queue_size": 0},
             "window": {"requests": 100, "failures": 0, "rps": 50.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0,
                        "error_rate": 0.0},
             "energy": {"joules": 1.0, "method": "nvml", "j_per_request": 0.01},
             "triton": {"valid": True, "mean_batch": 4.0, "mean_queue_us": 900.0, "mean_compute_us": 300.0},
             "slo": {"passed": True}}
    r = point_row(point)
    assert (r["instances"], r["max_queue_size"], r["preferred_batch_sizes"]) == (2, 0, [8, 16])
    assert (r["mean_batch"], r["j_per_request"], r["energy_method"], r["passed"]) == (4.0, 0.01, "nvml", True)
    invalid = point_row({**point, "triton": {"valid": False}, "energy": {"unavailable": "remote"}})
    assert invalid["mean_batch"] is None and invalid["j_per_request"] is None
