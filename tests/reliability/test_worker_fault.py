"""Fault: one of two gateway worker processes is killed with SIGKILL; the other keeps serving, and the
gateway is back to two workers without a restart of the gateway or of Triton."""

from __future__ import annotations

import os
import signal

import orjson
import pytest

from serve.supervisor import GatewayProcess
from serve.triton import free_port
from tests.reliability.conftest import gateway_settings
from tests.serve.fixtures import post, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
BODY = orjson.dumps({"images": [[[4.0] * 8] * 8]})


def _workers(pid: int) -> list[int]:
    """Live uvicorn worker processes (spawned children; not multiprocessing's resource tracker)."""
    import psutil

    workers = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                workers.append(child.pid)
        except psutil.Error:  # it ended while we looked
            pass
    return workers


def test_killing_one_gateway_worker_leaves_the_gateway_serving(stack, tmp_path):
    _, serving = stack
    gateway = GatewayProcess(gateway_settings(serving, port=free_port(), workers=2), tmp_path).start()
    try:
        url = f"{gateway.url}/v1/models/digits:predict"
        assert wait_until(lambda: len(_workers(gateway.pid)) >= 2, timeout=30)
        victim = _workers(gateway.pid)[0]
        triton_pid = serving.triton.pid  # the stack fixture runs the bundled Triton

        os.kill(victim, signal.SIGKILL)

        statuses = [post(url, BODY)[0] for _ in range(50)]
        assert statuses.count(200) == 50  # the surviving worker answered every request
        assert gateway.alive()
        assert wait_until(lambda: len(_workers(gateway.pid)) >= 2 and victim not in _workers(gateway.pid),
                          timeout=30)  # uvicorn's supervisor replaced the dead worker
        assert all(post(url, BODY)[0] == 200 for _ in range(20))
        assert serving.triton.pid == triton_pid  # Triton was never restarted
    finally:
        gateway.stop()
