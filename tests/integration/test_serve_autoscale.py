"""The autoscaler on a live Triton with short windows: load pushes latency over the threshold → more
instances (applied in place, no failed request); idle → back to the minimum."""

import asyncio
import threading

import numpy as np
import orjson
import pytest

from autoglm.artifacts import RunDir
from autoglm.autoscaling import AutoscaleRules
from serve.autoscale import Autoscaler, TritonActuator, TritonMetrics
from serve.triton import TritonServer, free_ports
from tests.serve.fixtures import published_run, require_triton, wait_until

pytestmark = pytest.mark.integration
RULES = AutoscaleRules(latency_ms=2.0, up_after_s=0.5, utilization_below=0.3, down_after_s=1.0, max_instances=2,
                       up_cooldown_s=0, down_cooldown_s=0, interval_s=0.25)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    require_triton()
    settings = published_run("digits")
    repository = RunDir(settings.run.root, settings.run.name).stage_dir("repository") / "python"
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repository, workdir=tmp_path_factory.mktemp("autoscale"), http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    with server:
        yield server


class Load:
    """32 closed-loop clients sending digits to Triton from a thread, until stopped."""

    def __init__(self, url: str):
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        self.url = f"{url}/v2/models/digits-fp32/infer"
        self.body = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                              "data": x.ravel().tolist()}]})
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding"]) as session:
            async def client():
                while not self.stop.is_set():
                    async with session.post(self.url, data=self.body) as r:
                        await r.read()
                        self.statuses.append(r.status)
            await asyncio.gather(*[client() for _ in range(32)])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_scales_up_under_latency_and_back_down_when_idle(triton):
    actuator = TritonActuator(triton.http_url)
    scaler = Autoscaler(RULES, "digits-fp32", TritonMetrics(triton.metrics_url, "digits-fp32"), actuator)
    assert actuator.instances("digits-fp32") == 1
    scaler.start()
    try:
        with Load(triton.http_url) as load:
            assert wait_until(lambda: any(d.direction == "up" for d in scaler.decisions), timeout=60)
            assert wait_until(lambda: actuator.instances("digits-fp32") == 2, timeout=10)
            served_during_scaling = len(load.statuses)
        assert set(load.statuses) == {200} and served_during_scaling > 0  # the change dropped no request
        assert wait_until(lambda: actuator.instances("digits-fp32") == 1, timeout=60)
    finally:
        scaler.stop()
    up, down = scaler.decisions[0], scaler.decisions[-1]
    print(f"\nautoscale: {up.before}->{up.after} ({up.reason}); {down.before}->{down.after} ({down.reason})")
    assert (up.rule, up.before, up.after) == ("latency", 1, 2)
    assert (down.rule, down.before, down.after) == ("utilization", 2, 1)
