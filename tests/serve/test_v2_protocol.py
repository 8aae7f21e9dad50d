"""The v2 routes speak Triton's HTTP protocol: compressed request bodies (with the body limit on the
inflated size), response compression asked of Triton, inference statistics relayed, and the
extensions a network gateway cannot serve refused with a reason. Against the fake Triton."""

import gzip
import resource
import zlib

import numpy as np
import orjson
import pytest

from serve.gateway.compression import inflate, response_coding
from serve.gateway.errors import Refused
from tests.serve.asgi import gateway_client as client
from tests.serve.fakes import fake_gateway
from tests.serve.fixtures import zip_bomb
from tests.serve.test_gateway import IMAGE, v2_binary, v2_json

pytestmark = pytest.mark.anyio
X = np.full((2, 1, 8, 8), 0.5, np.float32)


@pytest.mark.parametrize(("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress),
                                                  ("GZIP", gzip.compress), ("identity", lambda b: b)])
async def test_compressed_infer_bodies_are_inflated_validated_and_forwarded_plain(coding, compress):
    gw, triton = fake_gateway()
    body, headers = v2_binary(X)
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=compress(body),
                             headers={**headers, "content-encoding": coding})
        predicted = await c.post("/v1/models/digits:predict", body=compress(orjson.dumps({"images": [IMAGE]})),
                                 headers={"content-encoding": coding})
    assert reply.status == 200 and predicted.status == 200, (reply.body, predicted.body)
    _, _, sent, sent_headers = [r for r in triton.requests if r[1].endswith(b"/infer")][0]
    assert sent == body and b"Content-Encoding" not in sent_headers


async def test_gzip_members_back_to_back_are_one_body():
    gw, _ = fake_gateway()
    body = orjson.dumps(v2_json(X))
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=gzip.compress(body[:50]) + gzip.compress(body[50:]),
                             headers={"content-encoding": "gzip"})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize(("coding", "body", "status", "words"), [
    ("gzip", b"not gzip at all", 400, "not valid gzip"),
    ("deflate", gzip.compress(b"{}"), 400, "not valid deflate"),
    ("gzip", gzip.compress(orjson.dumps(v2_json(X)))[:-9], 400, "ends before"),
    ("deflate", zlib.compress(b"{}") + b"tail", 400, "bytes after"),
    ("gzip", gzip.compress(b'{"inputs": ['), 400, "not valid JSON"),  # inflated, then validated as usual
    ("br", b"{}", 415, "gzip or deflate"),
    ("gzip, deflate", b"{}", 415, "gzip or deflate"),
])
async def test_bad_compressed_bodies_are_4xx_naming_the_fix(coding, body, status, words):
    gw, triton = fake_gateway()
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=body, headers={"content-encoding": coding})
    assert reply.status == status and words in reply.error, reply.body
    if status == 415:  # as Triton: the codings it takes
        assert reply.headers["accept-encoding"] == "gzip, deflate"
    assert not any(t.endswith(b"/infer") for _, t, _, _ in triton.requests)


async def test_a_zip_bomb_is_a_413_at_the_limit_without_inflating_it():
    gw, triton = fake_gateway(max_body_bytes=256 * 1024)
    bomb = zip_bomb(128)  # ≈130 KB, under the limit as sent; 128 MiB inflated
    assert len(bomb) < 256 * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=bomb, headers={"content-encoding": "gzip"})
    assert reply.status == 413 and "limit of 262144 bytes" in reply.error and "decompressed" in reply.error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 32 * 1024  # KiB: never inflated whole
    assert not any(t.endswith(b"/infer") for _, t, _, _ in triton.requests)


def test_inflation_stops_one_byte_past_the_limit():
    body = zlib.compress(bytes(1000))
    assert inflate(body, b"deflate", 1000, "too big") == bytes(1000)
    with pytest.raises(Refused) as info:
        inflate(body, b"deflate", 999, "too big")
    assert info.value.status == 413


@pytest.mark.parametrize(("accept", "coding"), [
    ("gzip", "gzip"), ("deflate", "deflate"), ("gzip, deflate", "gzip"), ("deflate, gzip", "deflate"),
    ("gzip;q=0.5, deflate;q=0.8", "deflate"), ("identity, gzip", None), ("gzip;q=0", None), ("br", None),
    ("gzip;q=x, deflate", "deflate"), ("", None),
])
async def test_response_compression_is_asked_of_triton_as_triton_would_choose_it(accept, coding):
    assert response_coding(accept.encode()) == (coding.encode() if coding else None)
    gw, triton = fake_gateway()
    triton.infer_raw = ({b"content-type": b"application/json", b"content-encoding": b"gzip", b"connection": b"close"},
                        gzip.compress(b'{"outputs": []}'))
    async with client(gw) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", json=v2_json(X), headers={"accept-encoding": accept})
    sent = triton.requests[-1][3]
    assert sent.get(b"Accept-Encoding") == (coding.encode() if coding else None)
    assert reply.headers["content-encoding"] == "gzip" and "connection" not in reply.headers
    assert gzip.decompress(reply.body) == b'{"outputs": []}'


async def test_without_accept_encoding_triton_is_never_asked_to_compress():
    gw, triton = fake_gateway()
    async with client(gw) as c:
        await c.post("/v2/models/digits-fp32/infer", json=v2_json(X))
        await c.post("/v1/models/digits:predict", json={"images": [IMAGE]}, headers={"accept-encoding": "gzip"})
    assert not any(b"Accept-Encoding" in headers for _, _, _, headers in triton.requests)


@pytest.mark.parametrize("path", ["/v2/models/stats", "/v2/models/digits-fp32/stats",
                                  "/v2/models/digits-fp32/versions/1/stats"])
async def test_inference_statistics_are_relayed_under_the_guard(path):
    gw, triton = fake_gateway(api_keys=[{"name": "k", "sha256": "0" * 64}])
    async with client(gw) as c:
        refused = await c.get(path)
    gw, triton = fake_gateway()
    async with client(gw) as c:
        reply = await c.get(path)
    assert refused.status == 401
    assert reply.status == 200 and triton.requests[-1][1] == path.encode()


@pytest.mark.parametrize(("method", "path", "status", "words"), [
    ("GET", "/v2/systemsharedmemory/status", 400, "cannot share"),
    ("POST", "/v2/systemsharedmemory/region/r/register", 400, "binary_data=True"),
    ("POST", "/v2/systemsharedmemory/unregister", 400, "shared memory"),
    ("GET", "/v2/cudasharedmemory/region/r/status", 400, "connect to Triton directly"),
    ("POST", "/v2/cudasharedmemory/region/r/register", 400, "shared memory"),
    ("POST", "/v2/repository/index", 403, "operator-only"),
    ("POST", "/v2/repository/models/digits-fp32/load", 403, "python -m serve"),
    ("POST", "/v2/repository/models/digits-fp32/unload", 403, "Triton's own port"),
])
async def test_shared_memory_and_repository_control_are_refused_saying_why(method, path, status, words):
    gw, triton = fake_gateway()
    async with client(gw) as c:
        reply = await c.request(method, path, b"{}", {"content-type": "application/json"})
    assert reply.status == status and words in reply.error
    assert not triton.requests  # never forwarded
