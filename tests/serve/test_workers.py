"""A gateway of several workers is one gateway: its /metrics sum every worker's figures and its rate limits
hold for all of them, through the files of its shared directory; one worker keeps its own state as before."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import orjson
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from autoglm.errors import ConfigError
from autoglm.gateway_spec import ApiKey, hash_api_key
from serve.gateway.buckets import SLOTS, SharedBuckets
from serve.gateway.metrics import PUBLISH_INTERVAL_S, GatewayMetrics
from serve.settings import GatewaySettings
from serve.supervisor import GatewayProcess
from serve.triton import free_port
from tests.serve.fakes import FakeTritonServer
from tests.serve.fixtures import get, post, wait_until
from tests.serve.test_gateway import v2_json

INFER = "/v2/models/{model}/infer"
BODY = orjson.dumps(v2_json(np.zeros((1, 1, 8, 8), np.float32)))


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def per_worker_requests(shared) -> list[float]:
    """Inference requests each worker has published, from its own counter file."""
    return [sum(s.value for f in MultiProcessCollector.merge([str(path)]) if f.name == "autoglm_gateway_requests"
                for s in f.samples if s.labels["route"] == INFER) for path in sorted(shared.glob("counter_*.db"))]


# ---- in process: the shared files -----------------------------------------------------------------
def test_workers_sharing_a_table_share_each_key_bucket(tmp_path):
    one, two = (SharedBuckets(tmp_path / "b", rate=1.0, burst=3) for _ in range(2))  # two workers' views
    try:
        taken = [table.take("alice", 0.0) for table in (one, two, one, two)]
        assert taken[:3] == [0.0, 0.0, 0.0] and taken[3] == pytest.approx(1.0)  # 3 for both, not 3 each
        assert two.take("bob", 0.0) == 0.0  # another key, another bucket
        assert one.take("alice", 1.0) == 0.0 and two.take("alice", 1.0) > 0  # refilled at 1/s, once
    finally:
        one.close()
        two.close()


def test_a_full_table_reuses_idle_buckets_and_never_errs(tmp_path):
    table = SharedBuckets(tmp_path / "b", rate=1.0, burst=1)
    try:
        assert all(table.take(f"client-{i}", 0.0) == 0.0 for i in range(2 * SLOTS))  # more keys than slots
        assert table.take("client-0", 0.5) >= 0  # evicted or not, an answer
        assert all(table.take(f"late-{i}", 5.0) == 0.0 for i in range(100))  # idle slots are free again
    finally:
        table.close()


def test_a_scrape_of_one_worker_sums_every_worker(tmp_path):
    flights = {"a": 2, "b": 1}
    a = GatewayMetrics(lambda: flights["a"], shared_dir=tmp_path, worker=os.getpid())
    b = GatewayMetrics(lambda: flights["b"], shared_dir=tmp_path, worker=os.getppid())  # a second live process
    dead = GatewayMetrics(lambda: 5, shared_dir=tmp_path, worker=2**22 + 1)  # above any pid: a worker that died
    for metrics, n in ((a, 3), (b, 4), (dead, 1)):
        for _ in range(n):
            metrics.observe(INFER, 200, 0.003)
            metrics.observe_rows(INFER, 2)
        metrics.shed_one("rate_limit")
        metrics.shared.publish()
    got = samples(a.render().decode())
    route = (("route", INFER),)
    assert got[("autoglm_gateway_requests_total", (("route", INFER), ("status", "200")))] == 3 + 4 + 1
    assert got[("autoglm_gateway_request_seconds_count", route)] == 8
    assert got[("autoglm_gateway_request_seconds_bucket", (("le", "0.005"), *route))] == 8
    assert got[("autoglm_gateway_request_seconds_bucket", (("le", "0.002"), *route))] == 0
    assert got[("autoglm_gateway_request_rows_sum", route)] == 16
    assert got[("autoglm_gateway_shed_total", (("reason", "rate_limit"),))] == 3  # a dead worker's counts stay
    assert got[("autoglm_gateway_in_flight", ())] == 2 + 1  # a dead worker's in-flight requests do not
    assert ("autoglm_gateway_energy_joules_per_request", (("method", a.energy_method),)) in got
    assert not any(name.startswith("autoglm_gateway_cpu_seconds") for name, _ in got)  # only makes the energy


def test_a_shared_dir_that_does_not_exist_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="create it empty"):
        GatewayMetrics(shared_dir=tmp_path / "missing")


def test_one_worker_keeps_its_figures_in_process(tmp_path):
    gateway = GatewayProcess(GatewaySettings(port=free_port(), grpc_port=0), tmp_path)
    assert gateway.settings.shared_dir is None and GatewayMetrics().shared is None
    two = GatewayProcess(GatewaySettings(port=free_port(), grpc_port=0, workers=2), tmp_path)
    assert two.settings.shared_dir == tmp_path / "gateway-shared"


# ---- real uvicorn workers against the fake Triton over HTTP ---------------------------------------
@contextmanager
def two_workers(tmp_path, monkeypatch, **limits):
    # An idle worker accepts every waiting connection at once, so on a lightly loaded host one worker can take
    # them all; libuv's switch (uvloop runs on libuv) has each accept one, then yield: both get some.
    monkeypatch.setenv("UV_TCP_SINGLE_ACCEPT", "1")
    with FakeTritonServer() as triton:
        settings = GatewaySettings(port=free_port(), grpc_port=0, triton_url=triton.url, workers=2, **limits)
        gateway = GatewayProcess(settings, tmp_path).start(timeout_s=60)
        try:  # /healthz answered by one worker; each makes its files as it starts
            assert wait_until(lambda: len(list(gateway.settings.shared_dir.glob("gauge_livesum_*.db"))) == 2)
            yield gateway
        finally:
            gateway.stop()


def send(url: str, n: int, headers: dict | None = None) -> list[int]:
    """``n`` POSTs from 8 threads, a connection each: uvicorn's workers take them as they come."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: post(url, BODY, headers)[0], range(n)))


@pytest.mark.integration
def test_metrics_of_two_workers_add_up_and_their_files_go_on_stop(tmp_path, monkeypatch):
    with two_workers(tmp_path, monkeypatch) as gateway:
        shared = gateway.settings.shared_dir
        statuses = send(f"{gateway.url}/v2/models/digits-fp32/infer", 80)
        time.sleep(PUBLISH_INTERVAL_S + 0.5)  # every worker has published since
        scrapes = [samples(get(f"{gateway.url}/metrics")[1].decode()) for _ in range(4)]  # whichever worker answers
        workers = per_worker_requests(shared)
    assert statuses == [200] * 80
    assert len(workers) == 2 and all(n > 0 for n in workers), f"one worker took every request: {workers}"
    for got in scrapes:
        assert got[("autoglm_gateway_requests_total", (("route", INFER), ("status", "200")))] == 80
        assert got[("autoglm_gateway_request_seconds_count", (("route", INFER),))] == 80
        assert got[("autoglm_gateway_in_flight", ())] == 0
    assert not shared.exists()  # the runner's stop removed it


@pytest.mark.integration
def test_a_rate_limit_holds_for_two_workers_together(tmp_path, monkeypatch):
    rate, burst = 1.0, 10
    key = ApiKey(name="alice", sha256=hash_api_key("alice-key"))
    with two_workers(tmp_path, monkeypatch, api_keys=[key], rate_limit_rps=rate, rate_limit_burst=burst) as gateway:
        started = time.monotonic()
        statuses = send(f"{gateway.url}/v2/models/digits-fp32/infer", 60, {"authorization": "Bearer alice-key"})
        elapsed = time.monotonic() - started
        time.sleep(PUBLISH_INTERVAL_S + 0.5)
        workers = per_worker_requests(gateway.settings.shared_dir)
    admitted = statuses.count(200)
    assert statuses.count(429) == 60 - admitted and len(workers) == 2 and sum(workers) == 60
    with_a_bucket_each = sum(min(n, burst) for n in workers)  # the least that buckets per worker would admit
    assert burst <= admitted <= burst + rate * elapsed + 1 < with_a_bucket_each, (admitted, elapsed, workers)
