"""uvicorn's httptools protocol with a lean request cycle for the fast routes (v2 infer, ``:predict``).

uvicorn's own cycle costs ≈28 µs of CPU per request on this 2-core class of host (a do-nothing ASGI
app: ≈46 µs under uvicorn against ≈18 µs for a bare httptools protocol that starts a task per request):
an ``asyncio.Event`` per request, the URL parsed twice, every response header checked against a regex,
and the status line and the body written in two ``send()`` system calls. The fast routes are
answered by our own code, which sends one ``http.response.start`` carrying Content-Length and one
body, so for them :class:`FastCycle` skips what such an answer does not need and writes head and
body in one call. Everything else — other paths and methods, HTTP/1.0, ``Expect: 100-continue``,
upgrades, a root path, uvicorn's access log or concurrency limit — keeps uvicorn's own cycle.

Pipelining, keep-alive timeouts, graceful shutdown (in-flight requests finish, then the connection
closes) and client disconnects stay uvicorn's: a :class:`FastCycle` fills the same slot and has the
attributes uvicorn's protocol reads. Select it with ``uvicorn --http`` :data:`PROTOCOL`. It leans on
uvicorn's protocol internals (constraints.txt pins uvicorn; ``tests/serve/test_http_protocol.py`` checks
its answers byte for byte against uvicorn's own cycle).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from autoglm.gateway_spec import UVICORN_HTTP as PROTOCOL  # the value of uvicorn's --http
from serve.gateway.fast_path import fast_route_of

log = logging.getLogger("uvicorn.error")


class _Wakeup:
    """What uvicorn's protocol calls ``message_event``: ``set()`` wakes the cycle's receive, if it waits."""

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: asyncio.Future | None = None

    def set(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class FastCycle:
    """One fast-route request on a connection: its body as it arrives, its one response."""

    __slots__ = ("scope", "transport", "flow", "default_headers", "on_response", "keep_alive", "message_event",
                 "chunks", "size", "more_body", "disconnected", "response_started", "response_complete", "head",
                 "remaining")

    def __init__(self, scope: dict, transport: asyncio.Transport, flow, default_headers: list, keep_alive: bool,
                 on_response) -> None:
        self.scope, self.transport, self.flow = scope, transport, flow
        self.default_headers, self.on_response, self.keep_alive = default_headers, on_response, keep_alive
        self.message_event = _Wakeup()
        self.chunks: list[bytes] = []
        self.size = 0
        self.more_body = True
        self.disconnected = self.response_started = self.response_complete = False
        self.head: list[bytes] = []
        self.remaining = 0  # body bytes the response still owes (its Content-Length)

    async def run_asgi(self, app) -> None:
        """``app`` on this request, guarded as uvicorn guards its own cycle."""
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started and not self.disconnected:
                self.keep_alive = False
                await self.send({"type": "http.response.start", "status": 500,
                                 "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                             (b"content-length", b"21")]})
                await self.send({"type": "http.response.body", "body": b"Internal Server Error"})
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing  # drop the reference back to the protocol

    async def receive(self) -> dict:
        if not self.chunks and self.more_body and not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            self.message_event.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.message_event.waiter
            finally:
                self.message_event.waiter = None
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        chunks, self.chunks, self.size = self.chunks, [], 0
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if message["type"] == "http.response.start":
            if self.response_started:
                raise RuntimeError("the response has already started")
            self.response_started = True
            head = [STATUS_LINE[message["status"]]]
            for name, value in (*self.default_headers, *message.get("headers", ())):
                if name.lower() == b"content-length":
                    self.remaining = int(value)
                head += [name, b": ", value, b"\r\n"]
            head.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
            self.head = head
            return
        if not self.response_started or self.response_complete:
            raise RuntimeError("a response body sent before its start or after its end")
        body = message.get("body", b"")
        self.remaining -= len(body)
        if self.head:  # the first body: with the head, in one write
            self.head.append(body)
            body, self.head = b"".join(self.head), []
        self.transport.write(body)
        if not message.get("more_body", False):
            if self.remaining:
                raise RuntimeError("the response body does not match its Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


def _nothing() -> None:
    pass


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the fast routes' requests get a :class:`FastCycle`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's cycle writes the access log and enforces --limit-concurrency: where either is on, it
        # answers every request. root_path would need the paths rewritten.
        self.lean = not (self.access_log or self.limit_concurrency is not None or self.root_path)

    def on_headers_complete(self) -> None:
        parser = self.parser
        if not self.lean or self.expect_100_continue or parser.get_method() != b"POST" or parser.should_upgrade() \
                or parser.get_http_version() != "1.1":
            return super().on_headers_complete()
        raw_path, _, query = self.url.partition(b"?")
        if raw_path[:1] != b"/" or b"%" in raw_path or b"#" in query:  # absolute or escaped forms: uvicorn's
            return super().on_headers_complete()
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return super().on_headers_complete()
        if fast_route_of(path) is None:
            return super().on_headers_complete()
        scope = self.scope
        scope["method"], scope["path"], scope["raw_path"], scope["query_string"] = "POST", path, raw_path, query
        existing = self.cycle
        self.cycle = FastCycle(scope, self.transport, self.flow, self.server_state.default_headers,
                               parser.should_keep_alive(), self.on_response_complete)
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:  # pipelined: runs when the one before it has answered (uvicorn's queue)
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not FastCycle:
            return super().on_body(body)
        if cycle.response_complete:
            return
        cycle.chunks.append(body)
        cycle.size += len(body)
        if cycle.size > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is not FastCycle:
            return super().on_message_complete()
        if not cycle.response_complete:
            cycle.more_body = False
            cycle.message_event.set()
