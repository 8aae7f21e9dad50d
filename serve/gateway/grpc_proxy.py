"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` relayed as bytes, behind the gateway's guard.

``tritonclient.grpc`` talks to the gateway's gRPC port unchanged. Every method is a grpc.aio handler
whose request and reply stay serialized protobuf (no (de)serializers on either side): the gateway checks
who asks and how much, then calls the same method on Triton's gRPC port with the same bytes. Its cost per
request is the admission and two buffer hand-overs, not a parse and re-encode of every tensor. Triton's
status codes and messages come back unchanged; the gateway's own refusals become gRPC codes
(:data:`GRPC_CODES`). Methods that cannot work across a network gateway (shared memory) or belong to the
operator (repository control, trace and log settings) are refused with a message that says so.

Limits as on HTTP, from the same :class:`~serve.gateway.guard.Guard` and metrics: health is open, metadata
needs a key (``authorization: Bearer ...`` metadata) within the rate limit, inference holds one in-flight
slot (a stream holds one while open). gRPC itself caps each message at ``max_body_bytes``
(RESOURCE_EXHAUSTED, answered before any handler runs). Unary calls end within ``request_timeout_s`` or
the client's deadline, whichever is sooner; a stream lives until its client's deadline or cancel, since an
open stream waiting for its next request is not a stalled one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from autoglm.errors import ConfigError
from serve.gateway.errors import Refused
from serve.gateway.worker import Gateway

SERVICE = "inference.GRPCInferenceService"
OPEN = ("ServerLive", "ServerReady")  # probes, like /v2/health/*: no key
KEYED = ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")  # key + rate limit
ADMITTED = ("ModelInfer",)  # key + rate limit + an in-flight slot
STREAMED = "ModelStreamInfer"
REFUSED = {
    **dict.fromkeys(("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                     "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"),
                    (grpc.StatusCode.UNIMPLEMENTED, "shared memory cannot work across a network gateway: the "
                     "regions live on Triton's host; send the tensors in the request")),
    **dict.fromkeys(("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
                    (grpc.StatusCode.PERMISSION_DENIED, "model repository control belongs to the operator: "
                     "use Triton's own port (or `autoglm serve --models`), not the gateway")),
    **dict.fromkeys(("TraceSetting", "LogSettings"),
                    (grpc.StatusCode.PERMISSION_DENIED, "trace and log settings belong to the operator: use "
                     "Triton's own port, not the gateway")),
}
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
              499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_NOT_FORWARDED = ("authorization", "user-agent", "grpc-", ":")  # the gateway's key stays here; transport is per hop
_TRITON_FAILURES = {grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
                    grpc.StatusCode.INTERNAL: "status_5xx", grpc.StatusCode.UNKNOWN: "status_5xx"}


class KServeProxy:
    """The gRPC side of one gateway worker: method handlers relaying to Triton over ``channel``."""

    def __init__(self, gw: Gateway, channel: grpc.aio.Channel):
        self.gw, self.guard, self.metrics = gw, gw.guard, gw.metrics
        self.timeout_s = gw.settings.request_timeout_s
        self._client = bool(gw.settings.rate_limit_rps and not gw.settings.api_keys)  # anonymous buckets by peer
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name in OPEN + KEYED + ADMITTED:
            call = channel.unary_unary(f"/{SERVICE}/{name}", _registered_method=True)  # bytes in, bytes out
            self.handlers[name] = grpc.unary_unary_rpc_method_handler(self._unary(name, call))
        call = channel.stream_stream(f"/{SERVICE}/{STREAMED}", _registered_method=True)
        self.handlers[STREAMED] = grpc.stream_stream_rpc_method_handler(self._stream(call))
        for name, (code, message) in REFUSED.items():
            self.handlers[name] = grpc.unary_unary_rpc_method_handler(self._refuse(name, code, message))

    # ---- admission ---------------------------------------------------------------------------------
    def _admit(self, name: str, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
        """The guard's checks for ``name`` (Refused otherwise); returns the metadata to forward to Triton.
        An admitted call (inference) holds an in-flight slot: the caller releases it."""
        authorization, forward = None, []
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value.encode()
            elif not key.startswith(_NOT_FORWARDED):
                forward.append((key, value))
        if name not in OPEN:
            client = context.peer().rpartition(":")[0] if self._client else ""
            if name in KEYED:
                self.guard.check(authorization, client)
            else:
                self.guard.admit(authorization, client)
        return tuple(forward)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.timeout_s if remaining is None else min(self.timeout_s, remaining)

    def _status(self, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """The code and message answering ``exc``: a refusal of the gateway's, or Triton's own status as is."""
        if isinstance(exc, grpc.aio.AioRpcError):
            code, message = exc.code(), exc.details() or ""
            kind = _TRITON_FAILURES.get(code)
            if kind:
                self.metrics.triton_error(kind)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED and not message.startswith("no answer"):
                message = f"no answer within the gateway's request timeout of {self.timeout_s:g} s ({message})"
        else:
            status, _, message = self.gw.refusal(exc)
            code = GRPC_CODES.get(status, grpc.StatusCode.UNAVAILABLE if status >= 500 else
                                  grpc.StatusCode.INVALID_ARGUMENT)
        return code, message

    @asynccontextmanager
    async def _answering(self, route: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """A call's refusal or Triton's failure answered as its gRPC status; every call counted under ``route``."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except (Refused, grpc.aio.AioRpcError) as exc:
            code, message = self._status(exc)
            await context.abort(code, message)
        finally:
            self.metrics.observe(route, code.name, time.perf_counter() - started)

    # ---- handlers ----------------------------------------------------------------------------------
    def _unary(self, name: str, upstream: grpc.aio.UnaryUnaryMultiCallable):
        route, admitted = f"grpc:/{SERVICE}/{name}", name in ADMITTED

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            async with self._answering(route, context):
                forward = self._admit(name, context)
                try:
                    return await upstream(request, timeout=self._timeout(context), metadata=forward)
                finally:
                    if admitted:
                        self.guard.release()

        relay.__name__ = name
        return relay

    def _stream(self, upstream: grpc.aio.StreamStreamMultiCallable):
        route = f"grpc:/{SERVICE}/{STREAMED}"

        async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async with self._answering(route, context):
                forward = self._admit(STREAMED, context)
                call = upstream(requests, timeout=context.time_remaining(), metadata=forward)
                try:
                    async for reply in call:
                        yield reply
                finally:
                    call.cancel()  # a no-op once finished; frees Triton's side when the client went away
                    self.guard.release()

        return relay

    def _refuse(self, name: str, code: grpc.StatusCode, message: str):
        route = f"grpc:/{SERVICE}/{name}"

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.metrics.observe(route, code.name, 0.0)
            await context.abort(code, message)

        return refuse


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def grpc_service(gw: Gateway) -> AsyncIterator[grpc.aio.Server | None]:
    """The gateway's gRPC server on ``grpc_port`` while the block runs (nothing when it is 0).

    Several uvicorn workers each start one on the same port: gRPC sets SO_REUSEPORT on Linux, so the
    kernel spreads connections over them, as it does for the HTTP port.
    """
    settings = gw.settings
    if not settings.grpc_port:
        yield None
        return
    # Triton's replies are bounded by what the client asked for, not by the gateway's request cap.
    channel = grpc.aio.insecure_channel(settings.triton_grpc_url, options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                                      ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 1)])
    proxy = KServeProxy(gw, channel)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, proxy.handlers),))
    server.add_registered_method_handlers(SERVICE, proxy.handlers)
    address = _address(settings.host, settings.grpc_port)
    try:
        if not server.add_insecure_port(address):
            raise ConfigError(f"the gateway cannot listen for gRPC on {address}: choose another "
                              f"serve.gateway.grpc_port (0 turns gRPC off)")
    except RuntimeError as exc:  # grpc raises instead of returning 0 on some versions
        raise ConfigError(f"the gateway cannot listen for gRPC on {address} ({exc}): choose another "
                          f"serve.gateway.grpc_port (0 turns gRPC off)") from None
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=5)  # in-flight calls finish; new ones are refused
        await channel.close()
