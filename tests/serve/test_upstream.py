"""The keep-alive pool against a tiny HTTP server: reuse, failures, and cancelled requests that must
not hand their late reply to the next request."""

import asyncio

import pytest

from serve.gateway.upstream import UpstreamError, UpstreamPool, UpstreamUnavailable
from serve.triton import free_port

pytestmark = pytest.mark.anyio


class EchoServer:
    """Answers each request with its path; ``/slow/<s>`` waits s seconds; ``/close`` hangs up; ``/bad`` is garbage."""

    def __init__(self):
        self.connections = 0
        self.writers = []
        self.port = free_port()

    async def handle(self, reader, writer):
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next((int(v) for k, _, v in (ln.partition(": ") for ln in lines) if k.lower() ==
                               "content-length"), 0)
                body = await reader.readexactly(length)
                path = lines[0].split()[1]
                if path.startswith("/slow/"):
                    await asyncio.sleep(float(path.split("/")[2]))
                if path == "/close":
                    break
                if path == "/bad":
                    writer.write(b"NOT HTTP\r\n\r\n")
                    await writer.drain()
                    break
                reply = (path + "|" + body.decode()).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for writer in self.writers:  # asyncio's Server.close() leaves open connections alone
            writer.close()


async def test_connections_are_reused_and_sized_to_concurrency():
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=4)
        replies = [await pool.request(b"POST", b"/a", b"x") for _ in range(5)]
        many = await asyncio.gather(*[pool.request(b"GET", f"/{i}".encode()) for i in range(12)])
        await pool.aclose()
    assert {r.body for r in replies} == {b"/a|x"} and replies[0].headers[b"content-type"] == b"text/plain"
    assert [r.body for r in many] == [f"/{i}|".encode() for i in range(12)]
    assert pool.opened <= 4 and server.connections == pool.opened


async def test_a_cancelled_request_never_hands_its_reply_to_the_next():
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=1)
        task = asyncio.create_task(pool.request(b"GET", b"/slow/0.2"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await pool.request(b"GET", b"/next")
    assert after.body == b"/next|"
    assert pool.opened == 2  # the cancelled request's connection was closed, not reused


async def test_requests_beyond_the_size_wait_in_order_and_a_cancelled_waiter_frees_its_place():
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=1)
        first = asyncio.create_task(pool.request(b"GET", b"/slow/0.1"))
        await asyncio.sleep(0.02)
        cancelled = asyncio.create_task(pool.request(b"GET", b"/cancelled"))
        waiting = [asyncio.create_task(pool.request(b"GET", f"/{i}".encode())) for i in range(3)]
        await asyncio.sleep(0.02)
        cancelled.cancel()
        done = await asyncio.wait_for(asyncio.gather(first, *waiting), 2)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        later = await asyncio.wait_for(asyncio.gather(*[pool.request(b"GET", b"/later") for _ in range(3)]), 2)
    assert [r.body for r in done] == [b"/slow/0.1|", b"/0|", b"/1|", b"/2|"]
    assert [r.body for r in later] == [b"/later|"] * 3 and pool.opened == 1


async def test_timeout_raises_and_closes_the_connection():
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=1)
        with pytest.raises(TimeoutError):
            await pool.request(b"GET", b"/slow/0.3", timeout_s=0.05)
        assert (await pool.request(b"GET", b"/ok")).body == b"/ok|"
    assert pool.opened == 2


async def test_unreachable_and_broken_upstreams_are_reported():
    pool = UpstreamPool("127.0.0.1", free_port(), size=2, connect_timeout_s=0.5)
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        await pool.request(b"GET", b"/")
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=2)
        with pytest.raises(UpstreamUnavailable, match="before replying"):
            await pool.request(b"GET", b"/close")
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.request(b"GET", b"/bad")
        assert (await pool.request(b"GET", b"/fine")).body == b"/fine|"


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once():
    async with EchoServer() as server:
        pool = UpstreamPool("127.0.0.1", server.port, size=1)
        await pool.request(b"GET", b"/warm")
    # the server is gone: its idle connection is dead; a new server on the same port takes over
    server2 = EchoServer()
    server2.port = server.port
    async with server2:
        await asyncio.sleep(0.05)
        reply = await pool.request(b"GET", b"/again")
    assert reply.body == b"/again|" and pool.opened == 2
