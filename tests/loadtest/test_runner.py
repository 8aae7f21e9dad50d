"""The runner's join of locust's window with the energy meter (no locust process here)."""

from loadtest.latency import Slo
from loadtest.runner import LoadSpec, _joined


def _summary(requests: int, seconds: float) -> dict:
    window = {"requests": requests, "failures": 0, "seconds": seconds, "rps": requests / seconds, "p95_ms": 10.0}
    return {"window": window, "phases": [], "breaches": []}


def test_joules_per_request_charge_the_requests_of_the_meters_own_span():
    spec = LoadSpec("task", "http://127.0.0.1:1", "m", users=1, duration_s=10, slo=Slo(100, 0.01))
    # 100 requests in a 10 s window; the meter started late and measured 8 s of it: 80 requests' worth
    joined = {"energy": {"joules": 50.0, "seconds": 8.0, "method": "estimated:cpu"}, "triton": None}
    assert _joined(spec, _summary(100, 10.0), joined, 0)["energy"]["j_per_request"] == 50.0 / 80
    joined = {"energy": {"joules": 50.0, "method": "estimated:cpu"}, "triton": None}  # no span: the window's
    assert _joined(spec, _summary(100, 10.0), joined, 0)["energy"]["j_per_request"] == 0.5
