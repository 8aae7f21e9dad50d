"""The supervisor with fake processes: start order, restart with backoff, state, stop in reverse."""

import time

import pytest

from autoglm.errors import AutoGLMError
from serve.supervisor import Supervisor


class FakeProcess:
    def __init__(self, name, log, fail_starts=0):
        self.name, self.log, self.fail_starts = name, log, fail_starts
        self.running = False

    def start(self, timeout_s=0):
        self.log.append(("start", self.name))
        if self.fail_starts:
            self.fail_starts -= 1
            raise AutoGLMError(f"{self.name} would not start")
        self.running = True

    def stop(self, timeout_s=0):
        self.log.append(("stop", self.name))
        self.running = False

    def alive(self):
        return self.running


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_starts_in_order_and_stops_in_reverse():
    log = []
    with Supervisor({"triton": FakeProcess("triton", log), "gateway": FakeProcess("gateway", log)},
                    interval_s=0.01) as supervisor:
        assert supervisor.states() == {"triton": "running", "gateway": "running"}
    assert log == [("start", "triton"), ("start", "gateway"), ("stop", "gateway"), ("stop", "triton")]
    assert supervisor.states() == {"triton": "stopped", "gateway": "stopped"}


def test_a_dead_process_is_restarted_with_growing_backoff():
    log = []
    triton = FakeProcess("triton", log)
    supervisor = Supervisor({"triton": triton}, interval_s=0.01, backoff_s=0.05, max_backoff_s=0.2).start()
    try:
        triton.running = False  # it crashed
        assert wait_for(lambda: supervisor.status["triton"].restarts == 1)
        triton.fail_starts = 2
        triton.running = False  # crashes again, and the next two starts fail
        assert wait_for(lambda: supervisor.status["triton"].restarts == 2)
    finally:
        supervisor.stop()
    status = supervisor.status["triton"]
    assert status.last_error == "triton would not start" and len(status.restart_seconds) == 2
    assert status.restart_seconds[1] >= 0.1 + 0.2  # doubled backoff after each try, capped at 0.2
    assert log.count(("start", "triton")) == 1 + 1 + 3


def test_a_failed_first_start_stops_what_started_and_raises():
    log = []
    with pytest.raises(AutoGLMError, match="gateway would not start"):
        Supervisor({"triton": FakeProcess("triton", log),
                    "gateway": FakeProcess("gateway", log, fail_starts=1)}).start()
    assert ("stop", "triton") in log
