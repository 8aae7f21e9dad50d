"""An in-process OTLP/HTTP trace collector: what the gateway and Triton export, decoded and kept.

The serve benchmark's tracing rows export to it (a real collector's work, decoding every batch, off
the servers' CPU), and the tests check the spans it holds: which service sent them, their trace and
parent ids. ``with OtlpCollector() as collector:`` then ``collector.endpoint`` for
``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``collector.spans()``; ``keep=False`` only counts the batches.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int  # OTLP's SpanKind: 2 server, 3 client
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _from_json(payload: dict):
    """An OTLP/JSON export request as the protobuf message (ids from hex; attribute values as their kind)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    def attributes(items) -> list:
        out = []
        for item in items or ():
            (kind, value), = item["value"].items()
            value = int(value) if kind == "intValue" else value
            out.append(KeyValue(key=item["key"], value={_SNAKE.get(kind, kind): value}))
        return out

    request = ExportTraceServiceRequest()
    for rs in payload.get("resourceSpans", ()):
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.extend(attributes(rs.get("resource", {}).get("attributes")))
        for ss in rs.get("scopeSpans", ()):
            scope_spans = resource_spans.scope_spans.add()
            for span in ss.get("spans", ()):
                scope_spans.spans.add(name=span["name"], kind=int(span.get("kind", 0)),
                                      trace_id=bytes.fromhex(span["traceId"]), span_id=bytes.fromhex(span["spanId"]),
                                      parent_span_id=bytes.fromhex(span.get("parentSpanId") or ""),
                                      attributes=attributes(span.get("attributes")))
    return request


_SNAKE = {"stringValue": "string_value", "intValue": "int_value", "doubleValue": "double_value",
          "boolValue": "bool_value"}


class OtlpCollector:
    """Accepts ``POST /v1/traces`` on a free loopback port: OTLP protobuf (Python's exporter) or OTLP JSON
    (Triton's: trace and span ids as hex strings, as OTLP/JSON has them)."""

    def __init__(self, keep: bool = True):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                             ExportTraceServiceResponse)

        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.batches: dict[str, int] = {}  # by exporter (its User-Agent's product)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = 200
                agent = (self.headers.get("user-agent") or "?").split("/")[0]
                with collector._lock:
                    collector.batches[agent] = collector.batches.get(agent, 0) + 1
                try:  # keep=False: counted only (decoding is a collector's work, not the servers')
                    if keep and "json" in (self.headers.get("content-type") or ""):
                        collector._add(_from_json(json.loads(body)))
                    elif keep:
                        collector._add(ExportTraceServiceRequest.FromString(body))
                except Exception:  # a body that is not OTLP: the exporter hears 400
                    status = 400
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(status if self.path.endswith("/v1/traces") else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _add(self, request) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = next((_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                received += [ReceivedSpan(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                                          s.parent_span_id.hex(), {a.key: _value(a.value) for a in s.attributes})
                             for s in scope_spans.spans]
        with self._lock:
            self._spans += received

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def __enter__(self) -> OtlpCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
