"""The capacity-noise study's arithmetic without Triton: each estimator's reading of a ladder window, and the
windows a test needs to tell two configs apart."""

import math

import pytest

from bench._capacity_noise import ESTIMATORS, estimates, windows_needed
from loadtest.latency import Slo

SLO = Slo(p95_ms=20, error_rate=0.01)


def _phase(users, requests, p95, seconds=1.5):
    return {"phase": f"users={users}", "requests": requests, "rps": requests / seconds, "seconds": seconds,
            "p95_ms": p95, "error_rate": 0.0}


def test_each_estimator_reads_the_same_window_its_own_way():
    # the top step is over the SLO; of the two within it, the higher one measured less (noise)
    window = {"phases": [_phase(4, 3000, 5), _phase(8, 2700, 9), _phase(12, 4200, 30)],
              "energy": {"j_per_request": 0.002}}
    read = estimates(window, SLO, watts_per_core=10.0)
    assert read[ESTIMATORS[0]] == pytest.approx(5700 / 3.0)  # the study's: out-of-order steps pooled
    assert read[ESTIMATORS[1]] == pytest.approx(1800)  # the top step within the SLO, as measured
    assert read[ESTIMATORS[2]] == pytest.approx(5700 / 3.0)  # the top two within the SLO, pooled
    assert read[ESTIMATORS[3]] == pytest.approx(5000)  # 10 W / 2 mJ: requests per CPU-second
    missed = estimates({"phases": [_phase(4, 100, 50)], "energy": {}}, SLO, 10.0)
    assert missed == dict.fromkeys(ESTIMATORS, 0.0)


def test_windows_needed_grow_with_the_noise_and_shrink_with_the_difference():
    steady, noisy = [100, 101, 99, 100], [80, 120, 95, 105]
    assert windows_needed(steady, [110, 111, 109, 110]) == pytest.approx(2.0)  # clear at once: the floor
    assert windows_needed(noisy, [110, 111, 109, 110]) > windows_needed(steady, [110, 111, 109, 110])
    assert windows_needed(noisy, [120, 160, 135, 145]) < windows_needed(noisy, [110, 150, 125, 135])
    assert math.isinf(windows_needed(steady, steady))
