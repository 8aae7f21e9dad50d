"""OpenTelemetry traces of the gateway: a SERVER span per request (fast routes, FastAPI routes, gRPC calls),
a CLIENT span per call to Triton beneath it, its traceparent sent to Triton; off, nothing imported and no
span; the otel extra named where it is missing; Triton's own tracing flags; uvicorn's access-log switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from autoglm.errors import ConfigError, MissingExtraError
from serve.gateway import create_app, get_gateway
from serve.gateway.worker import Gateway
from serve.settings import GatewaySettings
from serve.triton import TritonServer, TritonTracing, traces_endpoint
from tests.serve.asgi import AsgiClient
from tests.serve.fakes import CHARLM_KV, DIGITS, FakeTriton
from tests.serve.test_gateway import v2_json

pytestmark = pytest.mark.anyio
sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from serve.gateway.tracing import Tracing, check_installed  # noqa: E402

ROOT = Path(__file__).parents[2]
CALLER = "0af7651916cd43dd8448eb211c80319c"  # the caller's trace id and span id, in its traceparent
CALLER_SPAN = "b7ad6b7169203331"
IMAGE = orjson.dumps(v2_json(np.zeros((1, 1, 8, 8), np.float32)))


def traced(catalog=DIGITS, **settings):
    """(app, fake Triton, span exporter) of a gateway tracing into memory."""
    exporter, provider = InMemorySpanExporter(), sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing, triton = Tracing(provider), FakeTriton()
    gw = Gateway(GatewaySettings(tracing=True, **settings), pool=triton, catalog=catalog, tracing=tracing)
    app = create_app(gw.settings, tracing=tracing)
    app.dependency_overrides[get_gateway] = lambda: gw
    return app, gw, triton, exporter


def traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def context_of(header: bytes | str) -> list[str]:
    """[trace id, span id] of a traceparent header (its flags may add W3C's random-trace-id bit)."""
    return (header.decode() if isinstance(header, bytes) else header).split("-")[1:3]


def ids(span) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) in hex."""
    parent = f"{span.parent.span_id:016x}" if span.parent else None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


async def test_a_fast_route_is_a_server_span_over_its_triton_calls_which_carry_their_traceparent():
    app, _, triton, exporter = traced()
    async with AsgiClient(app) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=IMAGE,
                             headers={"traceparent": traceparent(CALLER, CALLER_SPAN)})
    assert reply.status == 200
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(server) == 1 and [s.name for s in clients] == ["GET /v2/models/digits-fp32/config",
                                                              "POST /v2/models/digits-fp32/infer"]
    trace_id, server_id, parent = ids(server[0])
    assert (trace_id, parent) == (CALLER, CALLER_SPAN)  # the caller's trace goes on
    assert server[0].name == "POST /v2/models/{model}/infer"
    assert server[0].attributes["http.route"] == "/v2/models/{model}/infer"
    assert server[0].attributes["http.response.status_code"] == 200
    sent = {target: headers for _, target, _, headers in triton.requests}
    for client in clients:
        assert ids(client)[0] == CALLER and ids(client)[2] == server_id  # children of the request's span
        assert client.attributes["http.response.status_code"] == 200
        path = client.attributes["url.path"].encode()
        assert context_of(sent[path][b"traceparent"]) == [CALLER, ids(client)[1]]  # Triton's parent


async def test_fastapi_routes_and_streams_are_traced_the_same_way():
    app, _, triton, exporter = traced(CHARLM_KV)
    async with AsgiClient(app) as c:
        reply = await c.post("/v1/models/charlm:generate", json={"prompt": "ab", "max_new_tokens": 3})
        assert reply.status == 200
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind == SpanKind.SERVER)  # FastAPI's own span, on our provider
    stream = next(s for s in spans if s.kind == SpanKind.CLIENT)
    assert server.name == "POST /v1/models/{model}:generate" and ids(server)[2] is None  # a new trace
    assert stream.name == "POST /v2/models/charlm-generate/generate_stream"
    assert ids(stream)[0] == ids(server)[0] and ids(stream)[2] == ids(server)[1]
    assert stream.end_time <= server.end_time
    sent = triton.requests[-1][3]
    assert context_of(sent[b"traceparent"]) == list(ids(stream)[:2])


async def test_failures_mark_the_spans_as_errors():
    app, _, triton, exporter = traced()
    async with AsgiClient(app) as c:
        await c.post("/v2/models/digits-fp32/infer", body=IMAGE)  # caches the signature
        triton.down = True
        reply = await c.post("/v2/models/digits-fp32/infer", body=IMAGE)
    assert reply.status == 503
    server, client = (next(s for s in exporter.get_finished_spans()[::-1] if s.kind == kind)
                      for kind in (SpanKind.SERVER, SpanKind.CLIENT))
    assert server.status.status_code == StatusCode.ERROR and server.attributes["http.response.status_code"] == 503
    assert client.status.status_code == StatusCode.ERROR and client.attributes["error.type"] == "UpstreamUnavailable"


async def test_a_request_the_sampler_drops_sends_triton_no_trace_context():
    app, _, triton, exporter = traced()
    async with AsgiClient(app) as c:
        reply = await c.post("/v2/models/digits-fp32/infer", body=IMAGE,
                             headers={"traceparent": traceparent(CALLER, CALLER_SPAN, "00")})
    assert reply.status == 200 and exporter.get_finished_spans() == ()
    assert all(b"traceparent" not in headers for *_, headers in triton.requests)


async def test_grpc_calls_are_a_server_and_a_client_span_with_the_callers_context_replaced():
    from serve.gateway.grpc_proxy import SERVICE, grpc_service
    from serve.triton import free_port
    from tests.serve.test_grpc import FakeTritonGrpc, digits_input, grpcclient

    fake = FakeTritonGrpc()
    server, address = await fake.serve()
    _, gw, _, exporter = traced(grpc_port=free_port(), triton_grpc_url=address)
    try:
        async with grpc_service(gw):
            async with grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.grpc_port}") as client:
                await client.infer("digits-fp32", digits_input(np.ones((1, 3), np.float32)),
                                   headers={"traceparent": traceparent(CALLER, CALLER_SPAN)})
                with pytest.raises(Exception):
                    await client.get_model_repository_index()  # refused by the gateway: a SERVER span only
    finally:
        await server.stop(None)
    spans = exporter.get_finished_spans()
    infer = [s for s in spans if s.name == f"{SERVICE}/ModelInfer"]
    server_span = next(s for s in infer if s.kind == SpanKind.SERVER)
    client_span = next(s for s in infer if s.kind == SpanKind.CLIENT)
    assert ids(server_span)[::2] == (CALLER, CALLER_SPAN) and ids(client_span)[2] == ids(server_span)[1]
    assert client_span.attributes["rpc.grpc.status_code"] == 0 and client_span.attributes["rpc.method"] == "ModelInfer"
    sent = dict(fake.metadata[-1])
    assert context_of(sent["traceparent"]) == list(ids(client_span)[:2])  # the caller's replaced by the gateway's
    refused = [s for s in spans if s.name.endswith("/RepositoryIndex")]
    assert [s.kind for s in refused] == [SpanKind.SERVER] and refused[0].attributes["rpc.grpc.status_code"] == 7


def test_tracing_off_imports_no_sdk_and_makes_no_span_even_with_a_global_provider():
    code = """
import asyncio, sys
import numpy as np
from serve.gateway import create_app, get_gateway
from serve.settings import GatewaySettings
from tests.serve.asgi import AsgiClient
from tests.serve.fakes import fake_gateway
from tests.serve.test_gateway import v2_json

async def requests(gw):
    app = create_app(gw.settings)
    app.dependency_overrides[get_gateway] = lambda: gw
    async with AsgiClient(app) as c:
        headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        assert (await c.post("/v2/models/digits-fp32/infer", json=v2_json(np.zeros((1, 1, 8, 8))),
                             headers=headers)).status == 200
        assert (await c.get("/v2/models/digits-fp32", headers=headers)).status == 200

gw, triton = fake_gateway()
asyncio.run(requests(gw))
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter, provider = InMemorySpanExporter(), TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # what another library might do in the same process
asyncio.run(requests(gw))
print(len(exporter.get_finished_spans()), sum(b"traceparent" in h for *_, h in triton.requests))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "0 0"]


def test_tracing_on_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'autoglm\[otel\]'"):
        create_app(GatewaySettings(tracing=True))
    monkeypatch.setattr("serve.gateway.tracing.find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"autoglm\[otel\].*serve\.gateway\.tracing=false"):
        check_installed()


def test_the_pipeline_exports_over_otlp_http_to_the_standard_endpoint(monkeypatch):
    from bench._otlp import OtlpCollector

    with OtlpCollector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        tracing = Tracing.from_environment()
        tracing.tracer.start_span("probe").end()
        tracing.shutdown()  # exports what is pending
        assert [(s.service, s.name) for s in collector.spans()] == [("autoglm-gateway", "probe")]
        monkeypatch.setenv("OTEL_SERVICE_NAME", "edge")
        tracing = Tracing.from_environment()
        tracing.tracer.start_span("probe").end()
        tracing.shutdown()
        assert collector.spans()[-1].service == "edge"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="OTLP over HTTP"):
        Tracing.from_environment()


def test_triton_traces_to_the_same_endpoint_only_what_carries_a_context(tmp_path, monkeypatch):
    assert traces_endpoint({}) == "http://localhost:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"}) == "http://otel:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                            "http://b:2/t"}) == "http://b:2/t"
    monkeypatch.setattr(TritonServer, "_backend_dir", lambda self, install: tmp_path / "backends")
    install = type("Install", (), {"binary": "tritonserver"})
    tracing = TritonTracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"})
    server = TritonServer(tmp_path, workdir=tmp_path / "w")
    plain = server.command(install)
    server.tracing = tracing
    traced_flags = server.command(install)
    assert traced_flags[:len(plain)] == plain and not [f for f in plain if f.startswith("--trace")]
    assert traced_flags[len(plain):] == [
        "--trace-config=mode=opentelemetry", "--trace-config=opentelemetry,url=http://otel:4318/v1/traces",
        "--trace-config=opentelemetry,resource=service.name=triton-inference-server",
        "--trace-config=rate=0", "--trace-config=count=-1", "--trace-config=level=TIMESTAMPS"]


def _gateway_log_lines(settings: GatewaySettings, workdir: Path, flag: str) -> list[str]:
    """The gateway's log after one request, run as uvicorn started with ``flag`` whatever the setting says."""
    from serve.supervisor import GatewayProcess
    from tests.serve.fakes import FakeTritonServer
    from tests.serve.fixtures import post

    with FakeTritonServer() as triton:
        gateway = GatewayProcess(settings.model_copy(update={"triton_url": triton.url}), workdir)
        command = gateway.command()
        assert ("--access-log" if settings.access_log else "--no-access-log") in command  # as the setting says
        gateway.command = lambda: [flag if f.endswith("access-log") else f for f in command]
        gateway.start(timeout_s=30)
        try:
            assert post(f"{gateway.url}/v2/models/digits-fp32/infer", IMAGE)[0] == 200
        finally:
            gateway.stop()
    return gateway.log_path.read_text().splitlines()


@pytest.mark.integration
def test_the_access_log_switch_holds_whatever_uvicorns_flags_say(tmp_path):
    from serve.triton import free_port

    line = '"POST /v2/models/digits-fp32/infer HTTP/1.1" 200'
    on = _gateway_log_lines(GatewaySettings(port=free_port(), access_log=True), tmp_path / "on", "--no-access-log")
    off = _gateway_log_lines(GatewaySettings(port=free_port()), tmp_path / "off", "--access-log")
    assert [ln for ln in on if line in ln] and not [ln for ln in off if line in ln]


@pytest.fixture(scope="module")
def identity_repository(tmp_path_factory) -> Path:
    """A Triton repository of one tiny model, ``ident`` (FP32 [4] -> the same), built in milliseconds."""
    from tests.serve.fixtures import require_triton

    require_triton()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from autoglm.tasks.base import IOSpec, TensorSpec
    from compress.repository import ModelConfig, write_model

    root = tmp_path_factory.mktemp("ident")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ident",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, root / "ident.onnx")
    io = IOSpec((TensorSpec("x", "float32", (4,)),), (TensorSpec("y", "float32", (4,)),))
    write_model(root / "repo", ModelConfig("ident", io, max_batch_size=8), root / "ident.onnx")
    return root / "repo"


@pytest.mark.integration
def test_one_request_reads_gateway_then_triton_then_model_in_one_trace(identity_repository, tmp_path, monkeypatch):
    """A real gateway and a real Triton export to one collector: over HTTP and over gRPC, Triton's request span
    is the child of the gateway's call to Triton, itself the child of the gateway's span of the request."""
    from bench._otlp import OtlpCollector
    from serve.supervisor import GatewayProcess
    from serve.triton import free_ports
    from tests.serve.fixtures import post, wait_until

    tritonclient = pytest.importorskip("tritonclient.grpc")
    with OtlpCollector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # both exporters: batches every 0.1 s
        http, grpc, metrics, gateway_http, gateway_grpc = free_ports(5)
        triton = TritonServer(identity_repository, workdir=tmp_path / "triton", http_port=http, grpc_port=grpc,
                              metrics_port=metrics, tracing=TritonTracing.from_environment())
        gateway = GatewayProcess(GatewaySettings(port=gateway_http, grpc_port=gateway_grpc, tracing=True,
                                                 triton_url=triton.http_url, triton_grpc_url=triton.grpc_url),
                                 tmp_path / "gateway")
        with triton.start(timeout_s=60):
            gateway.start(timeout_s=30)
            try:
                body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]})
                status, _ = post(f"{gateway.url}/v2/models/ident/infer", body,
                                 {"traceparent": traceparent(CALLER, CALLER_SPAN)})
                assert status == 200
                x = tritonclient.InferInput("x", [1, 4], "FP32")
                x.set_data_from_numpy(np.ones((1, 4), np.float32))
                tritonclient.InferenceServerClient(gateway.grpc_url).infer("ident", [x])
                assert wait_until(lambda: sum(s.name == "InferRequest" for s in collector.spans()) == 2, 15)
            finally:
                gateway.stop()  # its pipeline exports what is pending
    spans = collector.spans()
    by_id = {s.span_id: s for s in spans}
    requests = [s for s in spans if s.name == "InferRequest"]
    assert {s.service for s in requests} == {"triton-inference-server"}
    calls = [by_id[s.parent_span_id] for s in requests]  # the gateway's calls to Triton
    assert sorted((c.service, c.kind, c.name) for c in calls) == [
        ("autoglm-gateway", 3, "POST /v2/models/ident/infer"),
        ("autoglm-gateway", 3, "inference.GRPCInferenceService/ModelInfer")]
    served = [by_id[c.parent_span_id] for c in calls]  # the gateway's spans of the requests
    assert sorted(s.name for s in served) == ["POST /v2/models/{model}/infer",
                                              "inference.GRPCInferenceService/ModelInfer"]
    http = next(s for s in served if s.name.startswith("POST"))
    assert (http.trace_id, http.parent_span_id) == (CALLER, CALLER_SPAN)  # the caller's trace, continued
    assert all(c.trace_id == s.trace_id for c, s in zip(calls, served, strict=True))
    models = [s for s in spans if s.name == "ident"]  # Triton's model spans, beneath its request spans
    assert sorted(m.parent_span_id for m in models) == sorted(r.span_id for r in requests)
