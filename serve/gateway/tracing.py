"""OpenTelemetry traces of the gateway (``serve.gateway.tracing``, off by default).

On, every request is a SERVER span (the fast routes' here, FastAPI's own for the other routes) and
every call to Triton a CLIENT span beneath it, whose W3C ``traceparent`` goes to Triton with the
request, so Triton's own spans (:class:`serve.triton.TritonTracing`, same collector) join the trace:
one request reads gateway → Triton → model. The gRPC relay does the same per call, in the call's HTTP/2 headers.
Spans leave in batches over OTLP/HTTP to the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the other
``OTEL_*`` variables apply: service name, resource, sampler, propagators, batch sizes, headers).

Off, nothing here is imported and the request paths pay one ``is None`` check (the OpenTelemetry
SDK and exporter come with the ``otel`` extra). A request the sampler drops sends no ``traceparent``:
Triton traces exactly what the gateway keeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.util import find_spec

from autoglm._lazy import require
from autoglm.errors import ConfigError, MissingExtraError
from serve.triton import traces_endpoint

log = logging.getLogger("serve.gateway")
EXTRA = "otel"
SERVICE_NAME = "autoglm-gateway"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name the service
TRACE_FIELDS = (b"traceparent", b"tracestate")  # W3C trace context: replaced by the gateway's own, never relayed
GRPC_SERVER_ERRORS = frozenset((2, 4, 12, 13, 14, 15))  # UNKNOWN, DEADLINE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, LOSS


def check_installed() -> None:
    """MissingExtraError naming the ``otel`` extra unless the SDK and its OTLP/HTTP exporter can be imported:
    checked before a stack starts, so a gateway worker never fails on it mid-start."""
    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            raise MissingExtraError(f"serve.gateway.tracing needs {module}: pip install 'autoglm[{EXTRA}]' "
                                    f"(or set serve.gateway.tracing=false)")


class _BytesHeaders:
    """The propagators' getter over ASGI/HTTP2 headers held as {lower-case bytes: bytes}."""

    @staticmethod
    def get(carrier: dict, key: str) -> list[str] | None:
        value = carrier.get(key.encode())
        return None if value is None else [value.decode("latin-1")]

    @staticmethod
    def keys(carrier: dict) -> list[str]:
        return [k.decode("latin-1") for k in carrier]


class Tracing:
    """One worker's span pipeline: a tracer from ``provider`` and the context propagators.

    :meth:`from_environment` builds the OTLP one; tests hand in a provider with an in-memory exporter.
    """

    def __init__(self, provider, owned: bool = False):
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        self.provider, self.owned = provider, owned
        self.tracer = provider.get_tracer("serve.gateway")
        self._trace, self._context, self._propagator = trace, context, propagate.get_global_textmap()
        self._server, self._client, self._error = SpanKind.SERVER, SpanKind.CLIENT, StatusCode.ERROR

    @classmethod
    def from_environment(cls) -> Tracing:
        """Batched OTLP/HTTP export configured by the standard ``OTEL_*`` variables."""
        sdk = require("opentelemetry.sdk.trace", EXTRA, purpose="serve.gateway.tracing")
        export = require("opentelemetry.sdk.trace.export", EXTRA, purpose="serve.gateway.tracing")
        otlp = require("opentelemetry.exporter.otlp.proto.http.trace_exporter", EXTRA,
                       purpose="serve.gateway.tracing")
        from opentelemetry.sdk.resources import Resource

        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol != "http/protobuf":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: the gateway exports OTLP over HTTP "
                              f"(http/protobuf), as Triton does, so one collector endpoint serves both")
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = sdk.TracerProvider(resource=resource, shutdown_on_exit=False)  # lifespan shuts it down
        provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))
        log.info("tracing: spans of %s go to %s", resource.attributes["service.name"], traces_endpoint())
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Export what is pending and stop, when this pipeline was built here (a test's provider is its own)."""
        if self.owned:
            self.provider.shutdown()

    def fastapi_telemetry(self) -> dict:
        """FastAPI's native telemetry for the routes it answers: SERVER spans on this provider, nothing else
        (the gateway's Prometheus metrics count requests; OTEL env must not add a second exporter)."""
        return {"tracing": True, "tracer_provider": self.provider, "metrics": False, "logs": False,
                "operation_spans": False, "auto_configure": False}

    def _inject(self, span) -> list[tuple[bytes, bytes]]:
        """``span``'s context as request headers, for a sampled span; nothing otherwise (see module doc)."""
        if not span.get_span_context().trace_flags.sampled:
            return []
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, self._trace.set_span_in_context(span))
        return [(k.encode(), v.encode("latin-1")) for k, v in carrier.items()]

    # ---- the fast routes: a SERVER span around serve_fast --------------------------------------------
    async def serve(self, serve_fast, gw, route, scope, receive, send) -> None:
        """``serve_fast(gw, route, scope, receive, send)`` as a SERVER span, the caller's trace continued."""
        parent = self._propagator.extract(dict(scope["headers"]), getter=_BytesHeaders)
        server, client = scope.get("server") or (None, None), scope.get("client") or (None, None)
        attributes = {"http.request.method": scope["method"], "http.route": route.path, "url.path": scope["path"],
                      "url.scheme": scope.get("scheme", "http"), "network.protocol.version": scope.get("http_version")}
        attributes.update({k: v for k, v in (("server.address", server[0]), ("server.port", server[1]),
                                             ("client.address", client[0])) if v is not None})
        span = self.tracer.start_span(f"{scope['method']} {route.path}", context=parent, kind=self._server,
                                      attributes={k: v for k, v in attributes.items() if v is not None})
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        try:
            await serve_fast(gw, route, scope, receive, send_status)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self._error, type(exc).__name__)
            raise
        finally:
            self._context.detach(token)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attributes({"error.type": str(status)})
                span.set_status(self._error)
            span.end()

    # ---- calls to Triton over HTTP: CLIENT spans -------------------------------------------------------
    def traced_pool(self, pool, address: tuple[str, int]) -> TracedPool:
        return TracedPool(self, pool, address)

    def _client_span(self, method: bytes, target: bytes, address: tuple[str, int]):
        path = target.split(b"?", 1)[0].decode("latin-1")
        return self.tracer.start_span(f"{method.decode()} {path}", kind=self._client, attributes={
            "http.request.method": method.decode(), "url.path": path, "server.address": address[0],
            "server.port": address[1]})

    def _ended(self, span, status: int | None, exc: BaseException | None = None) -> None:
        if exc is not None:
            span.set_attributes({"error.type": type(exc).__name__})
            span.set_status(self._error, str(exc) or type(exc).__name__)
        elif status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:  # a client span fails on 4xx too (OpenTelemetry's HTTP conventions)
                span.set_attributes({"error.type": str(status)})
                span.set_status(self._error)
        span.end()

    # ---- gRPC calls relayed to Triton: a SERVER and a CLIENT span each --------------------------------
    def grpc_start(self, route: str, fields: list[tuple[bytes, bytes]], address: tuple[str, int] | None):
        """The spans of a gRPC call to ``route`` ("grpc:/package.Service/Method") whose request header
        ``fields`` hold the caller's trace context: (spans for :meth:`grpc_end`, the fields to forward with
        the caller's context replaced by the client span's). ``address`` None: the gateway answers the call
        itself, so no client span."""
        incoming = {name: value for name, value in fields if name in TRACE_FIELDS}
        parent = self._propagator.extract(incoming, getter=_BytesHeaders)
        name = route.removeprefix("grpc:/")
        service, _, method = name.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        server = self.tracer.start_span(name, context=parent, kind=self._server, attributes=attributes)
        if address is None:
            return (server, None), fields
        client = self.tracer.start_span(name, context=self._trace.set_span_in_context(server), kind=self._client,
                                        attributes={**attributes, "server.address": address[0],
                                                    "server.port": address[1]})
        forward = [field for field in fields if field[0] not in TRACE_FIELDS] if incoming else fields
        return (server, client), forward + self._inject(client)

    def grpc_end(self, spans, code: int) -> None:
        """End a call's spans with its gRPC status ``code``."""
        server, client = spans
        for span, failed in ((client, code != 0), (server, code in GRPC_SERVER_ERRORS)):
            if span is None:
                continue
            span.set_attribute("rpc.grpc.status_code", code)
            if failed:
                span.set_status(self._error)
            span.end()


class TracedPool:
    """An upstream pool (:class:`~serve.gateway.upstream.UpstreamPool`) whose requests and streams are
    CLIENT spans, each sending its ``traceparent`` to Triton; everything else is the pool's."""

    def __init__(self, tracing: Tracing, pool, address: tuple[str, int]):
        self.tracing, self.pool, self.address = tracing, pool, address

    def __getattr__(self, name: str):
        return getattr(self.pool, name)

    async def request(self, method: bytes, target: bytes, body: bytes = b"", headers=(), timeout_s: float = 30.0):
        span = self.tracing._client_span(method, target, self.address)
        try:
            response = await self.pool.request(method, target, body, [*headers, *self.tracing._inject(span)],
                                               timeout_s)
        except BaseException as exc:
            self.tracing._ended(span, None, exc)
            raise
        self.tracing._ended(span, response.status)
        return response

    @asynccontextmanager
    async def stream(self, method: bytes, target: bytes, body: bytes = b"", headers=(),
                     timeout_s: float = 30.0) -> AsyncIterator:
        """The pool's stream as one CLIENT span, from the request to the stream's last byte."""
        span = self.tracing._client_span(method, target, self.address)
        try:
            async with self.pool.stream(method, target, body, [*headers, *self.tracing._inject(span)],
                                        timeout_s) as reply:
                yield reply
        except BaseException as exc:
            self.tracing._ended(span, None, exc)
            raise
        self.tracing._ended(span, reply.status)
