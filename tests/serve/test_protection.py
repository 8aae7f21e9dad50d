"""Admission control on both kinds of routes: API keys, rate limit, body size, in-flight shedding,
timeouts, and the metrics that count them."""

import asyncio

import numpy as np
import pytest

from autoglm.gateway_spec import ApiKey, hash_api_key
from serve.gateway.buckets import TokenBucket
from serve.gateway.guard import Guard
from tests.serve.fakes import CHARLM, fake_gateway
from tests.serve.test_gateway import IMAGE, client, v2_json

pytestmark = pytest.mark.anyio
KEYS = [ApiKey(name="alice", sha256=hash_api_key("alice-key")), ApiKey(name="bob", sha256=hash_api_key("bob-key"))]
X = v2_json(np.zeros((1, 1, 8, 8), np.float32))


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


async def test_api_keys_guard_hot_and_fastapi_routes_but_not_health():
    gw, _ = fake_gateway(api_keys=KEYS)
    async with client(gw) as c:
        missing = await c.post("/v2/models/digits-fp32/infer", json=X)
        wrong = await c.post("/v1/models/digits:predict", json={"images": [IMAGE]}, headers=bearer("mallory"))
        meta = await c.get("/v2/models/digits-fp32", headers=bearer("nope"))
        ok = [await c.post("/v2/models/digits-fp32/infer", json=X, headers=bearer("alice-key")),
              await c.post("/v1/models/digits:predict", json={"images": [IMAGE]}, headers=bearer("bob-key")),
              await c.get("/v2/models/digits-fp32", headers={"authorization": "bearer alice-key"})]
        health = [await c.get(p) for p in ("/healthz", "/readyz", "/v2/health/ready", "/metrics")]
    assert (missing.status, wrong.status, meta.status) == (401, 401, 401)
    assert "missing API key" in missing.error and missing.headers["www-authenticate"].startswith("Bearer")
    assert [r.status for r in ok] == [200, 200, 200]
    assert [r.status for r in health] == [200, 200, 200, 200]


def test_keys_are_compared_as_digests_only():
    guard = Guard(fake_gateway(api_keys=KEYS)[0].settings)
    assert guard.authenticate(b"Bearer bob-key").name == "bob"
    assert "bob-key" not in repr(guard.__dict__)  # only sha256 digests are kept


async def test_rate_limit_is_per_key_with_retry_after():
    gw, _ = fake_gateway(api_keys=KEYS, rate_limit_rps=0.5, rate_limit_burst=2)
    async with client(gw) as c:
        alice = [await c.post("/v2/models/digits-fp32/infer", json=X, headers=bearer("alice-key")) for _ in range(3)]
        bob = await c.get("/v2/models/digits-fp32", headers=bearer("bob-key"))
        metrics = (await c.get("/metrics")).body.decode()
    assert [r.status for r in alice] == [200, 200, 429]
    assert int(alice[2].headers["retry-after"]) >= 1 and "rate limit" in alice[2].error
    assert bob.status == 200
    assert 'autoglm_gateway_shed_total{reason="rate_limit"} 1.0' in metrics


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert bucket.take(0.5) == 0.0 and bucket.take(0.5) > 0


async def test_bodies_above_the_limit_are_413_declared_or_streamed():
    gw, triton = fake_gateway(CHARLM, max_body_bytes=1024)
    big = b'{"prompt": "' + b"a" * 2000 + b'"}'
    async with client(gw) as c:
        declared = await c.post("/v2/models/charlm-fp32/infer", body=big)
        streamed = await c.post("/v2/models/charlm-fp32/infer", body=[big[:600], big[600:1200], big[1200:]])
        fastapi_declared = await c.post("/v1/models/charlm:generate", body=big)
        fastapi_streamed = await c.post("/v1/models/charlm:generate", body=[big[:600], big[600:]],
                                        headers={"content-type": "application/json"})
    assert [r.status for r in (declared, streamed, fastapi_declared, fastapi_streamed)] == [413] * 4
    assert "limit of 1024 bytes" in streamed.error and "limit of 1024 bytes" in fastapi_streamed.error
    assert not triton.requests


async def test_in_flight_bound_sheds_with_503_and_retry_after():
    gw, triton = fake_gateway(max_in_flight=2)
    triton.hold = asyncio.Event()
    async with client(gw) as c:
        first = [asyncio.create_task(c.post("/v2/models/digits-fp32/infer", json=X)) for _ in range(2)]
        while gw.guard.in_flight < 2:
            await asyncio.sleep(0.001)
        shed = await c.post("/v1/models/digits:predict", json={"images": [IMAGE]})
        triton.hold.set()
        done = await asyncio.gather(*first)
        after = await c.post("/v2/models/digits-fp32/infer", json=X)
        metrics = (await c.get("/metrics")).body.decode()
    assert shed.status == 503 and shed.headers["retry-after"] == "1" and "limit of 2" in shed.error
    assert [r.status for r in done] == [200, 200] and after.status == 200 and gw.guard.in_flight == 0
    assert 'autoglm_gateway_shed_total{reason="in_flight"} 1.0' in metrics


async def test_both_paths_admit_in_one_order_key_then_slot():
    gw, triton = fake_gateway(CHARLM, api_keys=KEYS, max_in_flight=1)
    triton.hold = asyncio.Event()
    infer = {"inputs": [{"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [0, 1]}]}
    async with client(gw) as c:
        running = asyncio.create_task(c.post("/v2/models/charlm-fp32/infer", json=infer, headers=bearer("alice-key")))
        while gw.guard.in_flight < 1:
            await asyncio.sleep(0.001)
        fast = [await c.post("/v2/models/charlm-fp32/infer", json=infer, headers=h) for h in ({}, bearer("bob-key"))]
        slow = [await c.post("/v1/models/charlm:score", json={"text": "abcd"}, headers=h)
                for h in ({}, bearer("bob-key"))]
        triton.hold.set()
        assert (await running).status == 200
    assert [r.status for r in fast] == [r.status for r in slow] == [401, 503]
    assert gw.guard.in_flight == 0 and gw.metrics.shed["in_flight"] == 2


async def test_generation_holds_an_in_flight_slot_too():
    gw, triton = fake_gateway(CHARLM, max_in_flight=1)
    triton.hold = asyncio.Event()
    async with client(gw) as c:
        running = asyncio.create_task(c.post("/v1/models/charlm:generate", json={"prompt": "a", "max_new_tokens": 2}))
        while gw.guard.in_flight < 1:
            await asyncio.sleep(0.001)
        shed = await c.post("/v1/models/charlm:score", json={"text": "abcd"})
        triton.hold.set()
        assert (await running).status == 200
    assert shed.status == 503 and gw.guard.in_flight == 0


async def test_slow_triton_is_a_504_within_the_request_timeout():
    gw, triton = fake_gateway(CHARLM, request_timeout_s=0.2)
    triton.hold = asyncio.Event()  # never set
    async with client(gw) as c:
        v2 = await c.post("/v2/models/charlm-fp32/infer", json={"inputs": [
            {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [0, 1]}]})
        generated = await c.post("/v1/models/charlm:generate", json={"prompt": "a"})
    assert v2.status == 504 and generated.status == 504 and "timeout of 0.2 s" in v2.error
    assert gw.guard.in_flight == 0


async def test_a_body_that_never_arrives_is_a_408_and_frees_its_slot():
    gw, _ = fake_gateway(request_timeout_s=0.2, max_in_flight=1)
    async with client(gw) as c:  # headers announce 100 bytes, then nothing comes
        stalled = await c.post("/v2/models/digits-fp32/infer", body=[], headers={"content-length": "100"})
    assert stalled.status == 408 and "did not arrive within 0.2 s" in stalled.error and gw.guard.in_flight == 0


async def test_metrics_count_requests_by_route_and_status_with_latency_and_rows():
    gw, _ = fake_gateway()
    async with client(gw) as c:
        await c.post("/v2/models/digits-fp32/infer", json=v2_json(np.zeros((3, 1, 8, 8), np.float32)))
        await c.post("/v2/models/digits-fp32/infer", json={"inputs": []})
        await c.get("/v2/models/digits-fp32")
        text = (await c.get("/metrics")).body.decode()
    assert 'autoglm_gateway_requests_total{route="/v2/models/{model}/infer",status="200"} 1.0' in text
    assert 'autoglm_gateway_requests_total{route="/v2/models/{model}/infer",status="400"} 1.0' in text
    assert 'autoglm_gateway_requests_total{route="/v2/models/{model}",status="200"} 1.0' in text
    assert 'autoglm_gateway_request_seconds_count{route="/v2/models/{model}/infer"} 2.0' in text
    assert 'autoglm_gateway_request_rows_bucket{le="4",route="/v2/models/{model}/infer"} 1.0' in text
    assert 'autoglm_gateway_in_flight 0.0' in text
    assert 'autoglm_gateway_energy_joules_per_request{method="estimated:gateway-cpu-s×10W"}' in text


async def test_without_keys_each_client_address_has_its_own_bucket():
    from tests.serve.asgi import AsgiClient

    gw, _ = fake_gateway(rate_limit_rps=0.5, rate_limit_burst=1)
    app = client(gw).app
    async with AsgiClient(app, client=("10.0.0.1", 1)) as first, AsgiClient(app, client=("10.0.0.2", 1)) as second:
        a = [await first.post("/v2/models/digits-fp32/infer", json=X) for _ in range(2)]
        b = await second.post("/v2/models/digits-fp32/infer", json=X)
    assert [r.status for r in a] == [200, 429] and b.status == 200
