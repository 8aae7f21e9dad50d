"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` relayed frame by frame, behind the guard.

``tritonclient.grpc`` talks to the gateway's gRPC port unchanged. Each client connection gets its own
connection to Triton's gRPC port (:mod:`serve.gateway.grpc_relay`): HTTP/2 frames pass byte for byte,
only header blocks are decoded, so the gateway reads each call's method and key and nothing of its
tensors. This module is the policy: which methods are open, keyed, admitted or refused, and what each
call is counted as. Triton's status codes and messages come back unchanged; the gateway's own refusals
become gRPC codes (:data:`GRPC_CODES`). Methods that cannot work across a network gateway (shared
memory) or belong to the operator (repository control, trace and log settings) are refused saying so.

Limits as on HTTP, from the same :class:`~serve.gateway.guard.Guard` and metrics: health is open, metadata
needs a key (``authorization: Bearer ...`` metadata) within the rate limit, inference holds one in-flight
slot (a stream holds one while open). A message above ``max_body_bytes`` is RESOURCE_EXHAUSTED. Unary
calls end within ``request_timeout_s`` or the client's deadline, whichever is sooner; a stream lives
until its client's deadline or cancel, since an open stream waiting for its next request is not stalled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum

from autoglm.errors import ConfigError
from serve.gateway.errors import Refused
from serve.gateway.worker import Gateway


class Code(IntEnum):
    """gRPC status codes (the numbers on the wire; the names label the metrics)."""

    OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS = range(7)
    PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE = range(7, 12)
    UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED = range(12, 17)


SERVICE = "inference.GRPCInferenceService"
OPEN = ("ServerLive", "ServerReady")  # probes, like /v2/health/*: no key
KEYED = ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")  # key + rate limit
ADMITTED = ("ModelInfer",)  # key + rate limit + an in-flight slot
STREAMED = "ModelStreamInfer"
REFUSED = {
    **dict.fromkeys(("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                     "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"),
                    (Code.UNIMPLEMENTED, "shared memory cannot work across a network gateway: the "
                     "regions live on Triton's host; send the tensors in the request")),
    **dict.fromkeys(("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
                    (Code.PERMISSION_DENIED, "model repository control belongs to the operator: "
                     "use Triton's own port (or `autoglm serve --models`), not the gateway")),
    **dict.fromkeys(("TraceSetting", "LogSettings"),
                    (Code.PERMISSION_DENIED, "trace and log settings belong to the operator: use "
                     "Triton's own port, not the gateway")),
}
GRPC_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 404: Code.NOT_FOUND,
              408: Code.DEADLINE_EXCEEDED, 413: Code.RESOURCE_EXHAUSTED, 429: Code.RESOURCE_EXHAUSTED,
              499: Code.CANCELLED, 503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}
HTTP_STATUS = {Code.OK: 200, Code.CANCELLED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,  # as grpc-gateway
               Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.PERMISSION_DENIED: 403,
               Code.RESOURCE_EXHAUSTED: 429, Code.FAILED_PRECONDITION: 400, Code.ABORTED: 409, Code.OUT_OF_RANGE: 400,
               Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500,
               Code.UNAUTHENTICATED: 401}
_TRITON_FAILURES = {Code.UNAVAILABLE: "unavailable", Code.DEADLINE_EXCEEDED: "timeout",
                    Code.INTERNAL: "status_5xx", Code.UNKNOWN: "status_5xx"}


class Answer(Exception):
    """A call the gateway answers itself with ``code`` and ``message`` (``call`` is None when not counted)."""

    def __init__(self, code: Code, message: str, call: Call | None = None):
        super().__init__(message)
        self.code, self.message, self.call = code, message, call


class Call:
    """One relayed call: what it is counted as, and the relay's per-stream state."""

    __slots__ = ("route", "admitted", "started", "timer", "need", "head", "replied", "client_ended", "spans",
                 "caller", "router", "window", "debt")

    def __init__(self, route: str, admitted: bool):
        self.route, self.admitted, self.started = route, admitted, time.perf_counter()
        self.timer, self.need, self.head, self.replied, self.client_ended = None, 0, b"", False, False
        self.spans = None  # its OpenTelemetry spans while tracing is on (serve.gateway.tracing)
        self.caller = None  # the API key's name (bytes) where keys are set: the canary split's client
        self.router = None  # with a routing file: the version written into its messages (serve.gateway.grpc_versions)
        self.window = self.debt = 0  # with a routing file: Triton's window for it, credits the relay added

    def oversized(self, payload: bytes, limit: int) -> bool:
        """Whether the next DATA ``payload`` starts a message above ``limit`` bytes: follows the gRPC
        framing (a 5-byte prefix holding the length, then the message) across DATA frames."""
        at, size = 0, len(payload)
        while at < size:
            if self.need:
                step = min(self.need, size - at)
                self.need -= step
                at += step
                continue
            take = 5 - len(self.head)
            self.head += bytes(payload[at:at + take])
            at += take
            if len(self.head) == 5:
                self.need, self.head = int.from_bytes(self.head[1:], "big"), b""
                if self.need > limit:
                    return True
        return False


class KServeProxy:
    """The gRPC policy of one gateway worker: admission, deadlines and counting of every call."""

    def __init__(self, gw: Gateway):
        self.gw, self.guard, self.metrics, self.tracing = gw, gw.guard, gw.metrics, gw.tracing
        self.timeout_s = gw.settings.request_timeout_s
        self.max_message = gw.settings.max_body_bytes
        self.by_peer = bool(gw.settings.rate_limit_rps and not gw.settings.api_keys)  # anonymous buckets by peer
        names = (*OPEN, *KEYED, *ADMITTED, STREAMED, *REFUSED)
        self._methods = {f"/{SERVICE}/{name}".encode(): (name, f"grpc:/{SERVICE}/{name}") for name in names}

    def open(self, path: bytes | None, authorization: bytes | None, client: str) -> Call:
        """The call for a new stream to ``path`` once the guard lets it through; Answer otherwise.
        An admitted call (inference, a stream) holds an in-flight slot until :meth:`finish`."""
        name, route = self._methods.get(path, (None, ""))
        if name is None:
            raise Answer(Code.UNIMPLEMENTED, f"the gateway relays {SERVICE} only, not {path!r}")
        call = Call(route, name in ADMITTED or name == STREAMED)
        if name in REFUSED:
            raise Answer(*REFUSED[name], call)
        if name not in OPEN:
            try:
                caller = self.guard.check(authorization, client) if name in KEYED else \
                    self.guard.admit(authorization, client)
            except Refused as exc:
                status, _, message = self.gw.refusal(exc)
                call.admitted = False
                raise Answer(GRPC_CODES.get(status, Code.UNAVAILABLE if status >= 500 else Code.INVALID_ARGUMENT),
                             message, call) from None
            if caller.name != "anonymous":
                call.caller = caller.name.encode()
        return call

    def routes(self, call: Call) -> bool:
        """Whether ``call`` carries inference messages whose version the routing picks: while versions move
        (a canary, a switch); otherwise Triton holds only the stable version and they pass as they came."""
        return call.admitted and self.gw.routing.versions_moving()

    def deadline(self, call: Call, client_timeout: float | None) -> float | None:
        """Seconds a call may wait for Triton's answer: None for a stream (its client's deadline rules)."""
        if call.route.endswith(STREAMED):
            return None
        return self.timeout_s if client_timeout is None else min(self.timeout_s, client_timeout)

    def timed_out(self) -> str:
        return f"no answer within the gateway's request timeout of {self.timeout_s:g} s"

    def too_large(self, length: int) -> str:
        return f"Received message larger than max ({length} vs. {self.max_message})"

    def finish(self, call: Call, code: int, upstream: bool) -> None:
        """Count a call that ended with ``code`` (Triton's or the link's when ``upstream``); free its slot."""
        if call.timer is not None:
            call.timer.cancel()
        if call.admitted:
            call.admitted = False
            self.guard.release()
        code = Code(code) if 0 <= code <= 16 else Code.UNKNOWN
        if upstream and code in _TRITON_FAILURES:
            self.metrics.triton_error(_TRITON_FAILURES[code])
        elapsed = time.perf_counter() - call.started
        self.metrics.observe(call.route, code.name, elapsed)
        if call.router is not None:  # per version, with the HTTP status the code maps to (5xx: the version's errors)
            for model, version, role in call.router.seen:
                self.metrics.observe_version(model, version, role, HTTP_STATUS[code], elapsed)
        if call.spans is not None:
            self.tracing.grpc_end(call.spans, code)
            call.spans = None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def grpc_service(gw: Gateway) -> AsyncIterator[asyncio.Server | None]:
    """The gateway's gRPC relay on ``grpc_port`` while the block runs (nothing when it is 0).

    Several uvicorn workers each listen on the same port (SO_REUSEPORT), so the kernel spreads
    connections over them, as it does for the HTTP port. On the way out new calls are refused (GOAWAY)
    and open ones get up to 5 s to finish.
    """
    from serve.gateway.grpc_relay import ClientSide

    settings = gw.settings
    if not settings.grpc_port:
        yield None
        return
    proxy, upstream, connections = KServeProxy(gw), _host_port(settings.triton_grpc_url), set()
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(lambda: ClientSide(proxy, upstream, connections),
                                          settings.host, settings.grpc_port, reuse_port=True)
    except OSError as exc:
        raise ConfigError(f"the gateway cannot listen for gRPC on {settings.host}:{settings.grpc_port} ({exc}): "
                          f"choose another serve.gateway.grpc_port (0 turns gRPC off)") from None
    try:
        yield server
    finally:
        server.close()
        for connection in list(connections):
            connection.drain()
        deadline = loop.time() + 5
        while any(c.calls for c in connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(connections):
            connection.close()
        await server.wait_closed()
