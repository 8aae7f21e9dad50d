"""The fast routes' lean request cycle under a real uvicorn server: the same bytes on the wire as uvicorn's own
cycle, pipelining, bodies in pieces, clients that leave, graceful shutdown, and uvicorn's cycle where it must."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.gateway import http_protocol
from serve.gateway.app import create_app
from serve.gateway.deps import get_gateway
from serve.gateway.http_protocol import GatewayProtocol
from serve.triton import free_port
from tests.serve.fakes import fake_gateway
from tests.serve.fixtures import wait_until
from tests.serve.test_gateway import v2_binary, v2_json

INFER = b"/v2/models/digits-fp32/infer"
IMAGE = np.full((1, 1, 8, 8), 0.5, np.float32)


@pytest.fixture
def lean_cycles(monkeypatch) -> list[str]:
    """The paths the lean cycle answered."""
    seen, run_asgi = [], http_protocol.FastCycle.run_asgi

    async def counted(cycle, app):
        seen.append(cycle.scope["path"])
        await run_asgi(cycle, app)

    monkeypatch.setattr(http_protocol.FastCycle, "run_asgi", counted)
    return seen


@contextmanager
def serving(gw, protocol=GatewayProtocol, **config):
    """uvicorn serving a gateway app on ``gw`` in a thread of its own; yields (server, port)."""
    app = create_app(gw.settings)
    app.dependency_overrides[get_gateway] = lambda: gw
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, loop="uvloop",
                                           lifespan="off", log_config=None, **{"access_log": False, **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 10)
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(10)


class ThreadHold:
    """``FakeTriton.hold`` released from the test's thread (the server's loop runs in another)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    async def wait(self) -> None:
        while not self.event.is_set():
            await asyncio.sleep(0.01)


def request(path: bytes, body: bytes = b"", headers: dict | None = None, method: bytes = b"POST") -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"host: gateway"]
    headers = {"content-type": "application/json", **(headers or {})}
    if "transfer-encoding" not in headers and method == b"POST":
        headers.setdefault("content-length", str(len(body)))
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def responses(sock: socket.socket, n: int) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """``n`` responses (status, headers but the date, body) read off ``sock``."""
    buffer, out = b"", []

    def more() -> None:
        nonlocal buffer
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} responses")
        buffer += chunk

    while len(out) < n:
        while b"\r\n\r\n" not in buffer:
            more()
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
        length = int(dict(headers)[b"content-length"])
        while len(buffer) < length:
            more()
        out.append((int(lines[0].split()[1]), [h for h in headers if h[0] != b"date"], buffer[:length]))
        buffer = buffer[length:]
    return out


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(port: int, data: bytes, n: int) -> list:
    with connect(port) as sock:
        sock.sendall(data)
        return responses(sock, n)


def test_fast_routes_answer_byte_for_byte_as_uvicorns_own_cycle(lean_cycles):
    binary, binary_headers = v2_binary(IMAGE)
    asks = [
        request(INFER, orjson.dumps(v2_json(IMAGE))),
        request(INFER, binary, {k: str(v) for k, v in binary_headers.items()}),
        request(INFER + b"?trace=1", orjson.dumps(v2_json(IMAGE))),
        request(b"/v2/models/digits-fp32/versions/1/infer", orjson.dumps(v2_json(IMAGE))),
        request(b"/v1/models/digits:predict", orjson.dumps({"images": [[[8.0] * 8]]})),  # not 8x8
        request(b"/v1/models/digits:predict", orjson.dumps({"images": [(IMAGE[0, 0] * 16).tolist()]})),
        request(b"/v2/models/nope/infer", orjson.dumps(v2_json(IMAGE))),
        request(INFER, b"{not json"),
        request(INFER, b"x" * 2048),  # above the body limit below
    ]
    answers = {}
    for protocol in (GatewayProtocol, HttpToolsProtocol):
        gw, _ = fake_gateway(max_body_bytes=1024)
        with serving(gw, protocol) as (_, port):
            answers[protocol] = [exchange(port, ask, 1)[0] for ask in asks]
    lean, uvicorns = answers[GatewayProtocol], answers[HttpToolsProtocol]
    assert [a[0] for a in lean] == [200, 200, 200, 200, 422, 200, 404, 400, 413]
    assert lean == uvicorns  # status, headers and body
    assert len(lean_cycles) == len(asks)  # each answered by the lean cycle, none by uvicorn's


def test_pipelined_requests_answer_in_order_between_framework_routes(lean_cycles):
    gw, _ = fake_gateway()
    good = request(INFER, orjson.dumps(v2_json(IMAGE)))
    with serving(gw) as (_, port):
        got = exchange(port, good + request(b"/healthz", method=b"GET") + request(b"/v2/models/nope/infer", b"{}")
                       + good, 4)
    assert [status for status, _, _ in got] == [200, 200, 404, 200]
    assert got[0][2] == got[3][2] and orjson.loads(got[1][2]) == {"status": "ok"}
    assert lean_cycles == ["/v2/models/digits-fp32/infer", "/v2/models/nope/infer", "/v2/models/digits-fp32/infer"]


def test_bodies_in_pieces_and_chunked_arrive_whole():
    gw, _ = fake_gateway()
    body = orjson.dumps(v2_json(IMAGE))
    with serving(gw) as (_, port), connect(port) as sock:
        ask = request(INFER, body)
        for piece in (ask[:-len(body)], body[:10], body[10:]):  # headers, then the body in two late pieces
            sock.sendall(piece)
            time.sleep(0.05)
        chunked = request(INFER, b"", {"transfer-encoding": "chunked"}) + b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
        sock.sendall(chunked)
        sock.sendall(request(INFER, b" " * 300_000 + body))  # past uvicorn's read high-water mark: paused, resumed
        (first, _, one), (second, _, two), (third, _, three) = responses(sock, 3)
    assert first == second == third == 200 and one == two == three
    assert orjson.loads(one)["outputs"][0]["data"] == pytest.approx([0.5 * k for k in range(1, 11)])


def test_a_client_that_leaves_mid_body_frees_its_slot():
    gw, _ = fake_gateway()
    with serving(gw) as (_, port):
        with connect(port) as sock:
            sock.sendall(request(INFER, b"x" * 100)[:-60])  # 40 of its 100 body bytes, then gone
            assert wait_until(lambda: gw.guard.in_flight == 1, 5)
        assert wait_until(lambda: gw.guard.in_flight == 0, 5)
        assert exchange(port, request(INFER, orjson.dumps(v2_json(IMAGE))), 1)[0][0] == 200


def test_shutdown_lets_the_request_in_flight_finish_then_closes():
    gw, triton = fake_gateway()
    triton.hold = ThreadHold()
    with serving(gw) as (server, port), connect(port) as sock:
        sock.sendall(request(INFER, orjson.dumps(v2_json(IMAGE))))
        assert wait_until(lambda: len(triton.requests) >= 2, 5)  # its config, then the infer held
        server.should_exit = True  # SIGTERM's effect
        time.sleep(0.3)
        triton.hold.event.set()
        [(status, headers, _)] = responses(sock, 1)
        assert status == 200 and (b"connection", b"close") in headers
        assert sock.recv(1) == b""  # then the connection closes


def test_uvicorns_cycle_answers_where_the_lean_one_cannot(lean_cycles):
    gw, _ = fake_gateway()
    access = logging.getLogger("uvicorn.access")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    body = orjson.dumps(v2_json(IMAGE))
    with serving(gw) as (_, port):  # Expect: 100-continue
        with connect(port) as sock:
            sock.sendall(request(INFER, b"", {"expect": "100-continue", "content-length": str(len(body))}))
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(body)
            assert responses(sock, 1)[0][0] == 200
        old = exchange(port, request(INFER, body).replace(b"HTTP/1.1", b"HTTP/1.0", 1), 1)
        assert old[0][0] == 200
    assert lean_cycles == []
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        with serving(gw, access_log=True) as (_, port):  # the access log on: uvicorn's cycle writes it
            assert exchange(port, request(INFER, body), 1)[0][0] == 200
    finally:
        access.removeHandler(handler)
    assert lean_cycles == [] and any("/v2/models/digits-fp32/infer" in line and "200" in line for line in lines)
