"""Overload: a gateway with a small in-flight bound, in front of the real Triton, under a closed-loop
burst far beyond what it can serve. Excess requests must be shed fast with 429/503 and Retry-After
(not queued until they time out, not 5xx of another kind), and the gateway must serve 200s again
within 5 s of the burst ending. p95 and RSS are printed, not asserted: timings on a shared 2-core
host are not a pass/fail signal.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from serve.supervisor import GatewayProcess
from serve.triton import free_port
from tests.reliability.conftest import gateway_settings
from tests.serve.fixtures import post, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")]
MAX_IN_FLIGHT = 4
BODY = orjson.dumps({"images": [[[4.0] * 8] * 8]})


async def _closed_loop(url: str, concurrency: int, seconds: float, limit: int) -> list[tuple[int, float, bool]]:
    """(status, latency s, has Retry-After) of each request: ``concurrency`` clients, bounded in time and count."""
    import aiohttp

    results: list[tuple[int, float, bool]] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     skip_auto_headers=["Accept-Encoding"]) as session:
        async def client():
            while time.monotonic() < deadline and len(results) < limit:
                started = time.perf_counter()
                async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    results.append((r.status, time.perf_counter() - started, "Retry-After" in r.headers))

        await asyncio.gather(*[client() for _ in range(concurrency)])
    return results


def _rss_mb(pid: int | None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20 if pid else float("nan")


@pytest.fixture(scope="module")
def bounded_gateway(stack, tmp_path_factory):
    _, serving = stack
    settings = gateway_settings(serving, port=free_port(), max_in_flight=MAX_IN_FLIGHT)
    gateway = GatewayProcess(settings, tmp_path_factory.mktemp("bounded-gateway")).start()
    try:
        yield gateway, serving
    finally:
        gateway.stop()


def test_burst_beyond_capacity_is_shed_with_retry_after_and_service_recovers(bounded_gateway):
    gateway, serving = bounded_gateway
    url = f"{gateway.url}/v1/models/digits:predict"
    rss_before = _rss_mb(gateway.pid)

    # Capacity: as many clients as the gateway admits, so none is shed.
    base = asyncio.run(_closed_loop(url, MAX_IN_FLIGHT, 2.0, 4000))
    assert {s for s, _, _ in base} == {200}
    capacity = len(base) / 2.0

    burst_s = 3.0
    burst = asyncio.run(_closed_loop(url, 16 * MAX_IN_FLIGHT, burst_s, 20000))
    statuses = [s for s, _, _ in burst]
    shed = [(s, retry) for s, _, retry in burst if s != 200]
    ok_latencies = [t for s, t, _ in burst if s == 200]

    ended = time.monotonic()
    assert wait_until(lambda: post(url, BODY)[0] == 200, timeout=5.0), "no 200 within 5 s after the burst"
    recovered_s = time.monotonic() - ended
    rss_after = _rss_mb(gateway.pid)

    print(f"\ncapacity {capacity:.0f} req/s at {MAX_IN_FLIGHT} in flight; burst offered "
          f"{len(burst) / burst_s:.0f} req/s ({len(burst) / burst_s / capacity:.1f}x) from {16 * MAX_IN_FLIGHT} "
          f"clients: {statuses.count(200)} served (p95 {np.percentile(ok_latencies, 95) * 1e3:.1f} ms vs "
          f"{np.percentile([t for _, t, _ in base], 95) * 1e3:.1f} ms unloaded), {len(shed)} shed "
          f"({sorted(set(s for s, _ in shed))}); 200 again after {recovered_s * 1e3:.0f} ms; "
          f"gateway RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert shed, "the burst never exceeded the in-flight bound"
    assert all(s in (429, 503) and retry for s, retry in shed), sorted(set(shed))[:5]
    assert ok_latencies, "nothing was served during the burst"
