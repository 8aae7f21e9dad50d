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


def test_a_meter_that_ran_a_sliver_of_the_window_is_no_reading_not_zero_joules():
    from loadtest.generate_space import j_per_token

    spec = LoadSpec("task", "http://127.0.0.1:1", "m", users=1, duration_s=10, slo=Slo(100, 0.01))
    # the open and close marks were read in one poll: the meter ran 10 ms of a 10 s window, and read no CPU
    joined = {"energy": {"joules": 0.0, "seconds": 0.01, "method": "estimated:cpu"}, "triton": None}
    energy = _joined(spec, _summary(100, 10.0), joined, 0)["energy"]
    assert "joules" not in energy and "the meter ran 0.01 s of the 10.00 s window" in energy["unavailable"]
    window = {"energy": energy, "window": {"tokens_per_s": 500.0, "seconds": 10.0}}
    assert j_per_token(window) is None  # the trial says so, where it read 0 mJ/token before
    assert j_per_token({"energy": {"joules": 3.0}, "window": {"tokens_per_s": 500.0}}) is None  # no span at all


def test_peak_rss_follows_a_process_that_grows_and_says_when_it_has_nothing():
    import subprocess
    import sys

    from loadtest.energy_join import EnergySource, PeakRss
    from loadtest.runner import _memory
    from loadtest.stage import recommended_peak_rss

    grow = "import sys,time; sys.stdin.readline(); x = bytearray(96 * 2**20); print(flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", grow], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        sampler = PeakRss([child.pid], every_s=10.0)
        sampler.sample(now=0.0)
        before = sampler.peak_bytes
        child.stdin.write("\n")
        child.stdin.flush()
        child.stdout.readline()  # the 96 MiB are allocated (bytearray zero-fills: resident)
        sampler.sample(now=5.0)  # under every_s since the last: skipped
        assert sampler.samples == 1 and sampler.peak_bytes == before
        record = _memory(sampler)  # the window's close always samples
        assert record["samples"] == 2 and record["pids"] == [child.pid]
        assert record["peak_rss_mib"] >= before / 2**20 + 90
    finally:
        child.kill()
        child.wait()
    assert "unavailable" in PeakRss([child.pid]).result()  # gone: nothing readable, said so
    remote = EnergySource(memory_urls=("http://10.0.0.1:8000",))
    assert "no local process serves http://10.0.0.1:8000" in remote.peak_rss()
    assert _memory("no energy source configured") == {"unavailable": "no energy source configured"}
    points = [{"id": "p00", "memory": {"peak_rss_mib": 300.0}}, {"id": "p01", "memory": {"peak_rss_mib": 410.5}}]
    assert recommended_peak_rss({"point": "p01"}, points) == 410.5
    assert recommended_peak_rss({"point": "t007"}, points) is None  # not a sweep point, and carries no figure
    assert recommended_peak_rss({"point": "t007", "peak_rss_mib": 512.0}, points) == 512.0  # a verified window's
    assert recommended_peak_rss({}, points) is None
