"""KServe v2 over gRPC against a fake Triton gRPC server, with tritonclient.grpc.aio as the client: bytes
relayed both ways, Triton's statuses passed through, the guard's refusals as gRPC codes, metrics counted."""

import asyncio

import grpc
import numpy as np
import pytest

from serve.gateway.grpc_proxy import REFUSED, SERVICE, grpc_service
from serve.triton import free_port, free_ports
from tests.serve.asgi import AsgiClient
from tests.serve.fakes import fake_gateway

pytestmark = pytest.mark.anyio
grpcclient = pytest.importorskip("tritonclient.grpc.aio")
pb = pytest.importorskip("tritonclient.grpc.service_pb2")
KEY = "agk_test"


class FakeTritonGrpc:
    """A few methods of Triton's gRPC service: ModelInfer doubles its FP32 input (``hold`` stalls it),
    ModelStreamInfer answers each request three times, unknown models fail with Triton's own text."""

    def __init__(self):
        self.hold: asyncio.Event | None = None
        self.metadata: list[tuple] = []
        self.versions: list[str] = []  # model_version of every inference request, as Triton parsed it
        self.options = [("grpc.max_receive_message_length", 64 << 20)]

    async def live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def model_metadata(self, request, context):
        if request.name != "digits-fp32":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        return pb.ModelMetadataResponse(name=request.name, platform="python")

    async def infer(self, request, context):
        self.metadata.append(tuple(context.invocation_metadata()))
        if self.hold is not None:
            await self.hold.wait()
        return self._doubled(request)

    async def stream(self, requests, context):
        async for request in requests:
            for _ in range(3):
                yield pb.ModelStreamInferResponse(infer_response=self._doubled(request))

    def _doubled(self, request) -> pb.ModelInferResponse:
        self.versions.append(request.model_version)
        x = np.frombuffer(request.raw_input_contents[0], np.float32)
        out = pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=request.inputs[0].shape)
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id, outputs=[out],
                                     raw_output_contents=[(x * 2).tobytes()])

    async def serve(self) -> tuple[grpc.aio.Server, str]:
        def unary(fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

        handlers = {
            "ServerLive": unary(self.live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary(self.infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.stream, pb.ModelInferRequest.FromString, pb.ModelStreamInferResponse.SerializeToString)}
        server = grpc.aio.server(options=self.options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"


@pytest.fixture
async def proxy(request):
    """(gateway, fake Triton, gateway address); ``@pytest.mark.parametrize('proxy', [settings], indirect=True)``."""
    triton = FakeTritonGrpc()
    server, address = await triton.serve()
    gw, _ = fake_gateway(grpc_port=free_port(), triton_grpc_url=address, **getattr(request, "param", {}))
    async with grpc_service(gw):
        yield gw, triton, f"127.0.0.1:{gw.settings.grpc_port}"
    await server.stop(None)


def digits_input(x: np.ndarray):
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


async def test_infer_relays_the_bytes_both_ways_and_counts_the_request(proxy):
    gw, triton, address = proxy
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    async with grpcclient.InferenceServerClient(address) as client:
        assert await client.is_server_live()
        result = await client.infer("digits-fp32", digits_input(x), request_id="r1", headers={"x-trace": "t1"})
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    assert result.get_response().id == "r1"
    assert ("x-trace", "t1") in triton.metadata[-1]  # the client's own metadata reaches Triton
    assert gw.metrics.requests[(f"grpc:/{SERVICE}/ModelInfer", "OK")] == 1
    assert gw.metrics.requests[(f"grpc:/{SERVICE}/ServerLive", "OK")] == 1 and gw.guard.in_flight == 0


async def test_tritons_own_status_and_text_pass_through_unchanged(proxy):
    _, _, address = proxy
    async with grpcclient.InferenceServerClient(address) as client:
        with pytest.raises(Exception) as raised:
            await client.get_model_metadata("nope")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert raised.value.message() == "Request for unknown model: 'nope' is not found"


async def test_streaming_relays_every_response_of_every_request(proxy):
    gw, _, address = proxy
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        async def requests():
            for n in range(2):
                yield {"model_name": "digits-fp32", "inputs": digits_input(x * (n + 1)), "request_id": str(n)}

        replies = [(result.get_response().id, result.as_numpy("y"))
                   async for result, error in client.stream_infer(requests()) if error is None]
    assert [rid for rid, _ in replies] == ["0"] * 3 + ["1"] * 3
    np.testing.assert_array_equal(replies[-1][1], x * 4)
    assert gw.metrics.requests[(f"grpc:/{SERVICE}/ModelStreamInfer", "OK")] == 1 and gw.guard.in_flight == 0


@pytest.mark.parametrize("proxy", [{"api_keys": [{"name": "ci", "sha256": __import__("hashlib").sha256(
    KEY.encode()).hexdigest()}], "host": "127.0.0.1"}], indirect=True)
async def test_api_keys_are_required_except_for_health(proxy):
    gw, triton, address = proxy
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        assert await client.is_server_live()  # probes need no key, as /v2/health/live
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(Exception) as raised:
                await client.infer("digits-fp32", digits_input(x), headers=headers)
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED", raised.value.message()
        result = await client.infer("digits-fp32", digits_input(x), headers={"authorization": f"Bearer {KEY}"})
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    assert gw.metrics.requests[(f"grpc:/{SERVICE}/ModelInfer", "UNAUTHENTICATED")] == 2
    assert all(key != "authorization" for key, _ in triton.metadata[-1])  # the key stays at the gateway


@pytest.mark.parametrize("proxy", [{"max_in_flight": 1}], indirect=True)
async def test_beyond_the_in_flight_bound_calls_are_unavailable_at_once(proxy):
    gw, triton, address = proxy
    triton.hold = asyncio.Event()
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        first = asyncio.create_task(client.infer("digits-fp32", digits_input(x)))
        while gw.guard.in_flight == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(Exception) as raised:
            await client.infer("digits-fp32", digits_input(x))
        triton.hold.set()
        await first
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and "limit of 1 requests" in raised.value.message()
    assert gw.metrics.shed["in_flight"] == 1 and gw.guard.in_flight == 0


@pytest.mark.parametrize("proxy", [{"rate_limit_rps": 0.001, "rate_limit_burst": 1}], indirect=True)
async def test_beyond_the_rate_limit_calls_are_resource_exhausted(proxy):
    gw, _, address = proxy
    async with grpcclient.InferenceServerClient(address) as client:
        await client.get_model_metadata("digits-fp32")
        with pytest.raises(Exception) as raised:
            await client.get_model_metadata("digits-fp32")
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "rate limit" in raised.value.message()


@pytest.mark.parametrize("proxy", [{"max_body_bytes": 4096}], indirect=True)
async def test_a_message_above_the_body_cap_is_refused(proxy):
    _, _, address = proxy
    async with grpcclient.InferenceServerClient(address) as client:
        with pytest.raises(Exception) as raised:
            await client.infer("digits-fp32", digits_input(np.ones((4, 1024), np.float32)))
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("proxy", [{"request_timeout_s": 0.2}], indirect=True)
async def test_a_call_past_the_request_timeout_is_deadline_exceeded(proxy):
    gw, triton, address = proxy
    triton.hold = asyncio.Event()
    async with grpcclient.InferenceServerClient(address) as client:
        with pytest.raises(Exception) as raised:
            await client.infer("digits-fp32", digits_input(np.ones((1, 3), np.float32)))
    triton.hold.set()
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "request timeout of 0.2 s" in raised.value.message() and gw.guard.in_flight == 0


async def test_shared_memory_and_repository_control_are_refused_saying_why(proxy):
    _, _, address = proxy
    async with grpcclient.InferenceServerClient(address) as client:
        with pytest.raises(Exception) as shm:
            await client.register_system_shared_memory("r", "/r", 64)
        with pytest.raises(Exception) as load:
            await client.load_model("digits-fp32")
    assert shm.value.status() == "StatusCode.UNIMPLEMENTED" and "across a network gateway" in shm.value.message()
    assert load.value.status() == "StatusCode.PERMISSION_DENIED" and "operator" in load.value.message()
    assert {"SystemSharedMemoryRegister", "CudaSharedMemoryRegister", "RepositoryModelLoad", "LogSettings"} <= set(REFUSED)


async def test_triton_unreachable_is_unavailable():
    port, nobody = free_ports(2)
    gw, _ = fake_gateway(grpc_port=port, triton_grpc_url=f"127.0.0.1:{nobody}")
    async with grpc_service(gw), grpcclient.InferenceServerClient(f"127.0.0.1:{gw.settings.grpc_port}") as client:
        with pytest.raises(Exception) as raised:
            await client.is_server_ready()
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and gw.metrics.triton_errors["unavailable"] == 1


async def test_the_apps_lifespan_runs_the_grpc_server_only_when_its_port_is_set():
    from serve.gateway import create_app

    port, nobody = free_ports(2)
    gw, _ = fake_gateway(grpc_port=port, triton_grpc_url=f"127.0.0.1:{nobody}")
    address = f"127.0.0.1:{gw.settings.grpc_port}"
    async with AsgiClient(create_app(gw.settings)):
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary(f"/{SERVICE}/RepositoryIndex")(b"")
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED  # answered by the gateway
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await channel.unary_unary(f"/{SERVICE}/ServerLive")(b"", timeout=1)
    assert gone.value.code() is grpc.StatusCode.UNAVAILABLE  # stopped with the app
    assert fake_gateway()[0].settings.grpc_port == 0  # a spec built by hand has no gRPC port


@pytest.mark.parametrize("proxy", [{"api_keys": [{"name": "ci", "sha256": __import__("hashlib").sha256(
    KEY.encode()).hexdigest()}], "max_body_bytes": 1 << 20}], indirect=True)
async def test_refused_calls_bodies_do_not_use_up_the_connections_window(proxy):
    gw, _, address = proxy
    x = np.ones((256, 256), np.float32)  # 256 KiB a call: 40 of them are far beyond any HTTP/2 window
    async with grpcclient.InferenceServerClient(address) as client:
        for _ in range(40):
            with pytest.raises(Exception) as raised:
                await client.infer("digits-fp32", digits_input(x), client_timeout=5)
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        result = await client.infer("digits-fp32", digits_input(x), headers={"authorization": f"Bearer {KEY}"},
                                    client_timeout=5)  # the same connection still sends
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    assert gw.guard.in_flight == 0


async def test_a_method_outside_the_service_is_unimplemented(proxy):
    _, _, address = proxy
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/other.Service/Call")(b"", timeout=5)
        assert await channel.unary_unary(f"/{SERVICE}/ServerLive")(b"", timeout=5) == b"\x08\x01"
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


# ---- the canary split over gRPC (a routing file: the relay writes the picked version into each message) ----
@pytest.fixture
async def canary(tmp_path):
    """(gateway, fake Triton with small windows, gateway address): digits-fp32 stable 1, canary 2 at weight 10;
    Triton's windows stay at HTTP/2's 64 KiB (no BDP probing), so big messages fill them."""
    from serve.gateway.canary import Split, write_routing

    routing = tmp_path / "routing.json"
    write_routing(routing, {"digits-fp32": Split(1, 2)}, 10.0)
    triton = FakeTritonGrpc()
    triton.options.append(("grpc.http2.bdp_probe", 0))
    server, address = await triton.serve()
    gw, _ = fake_gateway(grpc_port=free_port(), triton_grpc_url=address, routing_file=routing,
                         max_body_bytes=64 << 20)
    async with grpc_service(gw):
        yield gw, triton, f"127.0.0.1:{gw.settings.grpc_port}"
    await server.stop(None)


def version_requests(gw) -> dict:
    return {key: n for key, n in gw.metrics.versions.items() if key[0] == "digits-fp32"}


async def test_a_grpc_canary_takes_its_weight_keeps_each_client_and_respects_a_named_version(canary):
    gw, triton, address = canary
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        results = []
        for _ in range(25):  # anonymous: drawn per call; 40 at a time, within the in-flight bound
            results += await asyncio.gather(*(client.infer("digits-fp32", digits_input(x)) for _ in range(40)))
        assert all(np.array_equal(r.as_numpy("y"), x * 2) for r in results)
        drawn = list(triton.versions)
        for name in ("alice", "bob", "carol", "dave"):  # a known client stays on one version
            triton.versions.clear()
            for _ in range(10):
                await client.infer("digits-fp32", digits_input(x), headers={"x-client-id": name})
            assert len(set(triton.versions)) == 1 and triton.versions[0] in ("1", "2"), (name, triton.versions)
        triton.versions.clear()
        for _ in range(20):
            await client.infer("digits-fp32", digits_input(x), model_version="2")
        assert triton.versions == ["2"] * 20  # named by the client: kept
    assert set(drawn) == {"1", "2"} and len(drawn) == 1000
    assert abs(drawn.count("2") - 100) <= 4 * (1000 * 0.1 * 0.9) ** 0.5, drawn.count("2")  # binomial, 4 sigma
    counts = version_requests(gw)
    assert counts[("digits-fp32", "2", "pinned", 200)] == 20
    assert counts[("digits-fp32", "1", "stable", 200)] + counts[("digits-fp32", "2", "canary", 200)] == 1040
    assert gw.guard.in_flight == 0


async def test_big_messages_and_streams_keep_flow_control_exact(canary):
    gw, triton, address = canary
    big = np.arange(300 * 1024, dtype=np.float32).reshape(1, -1)  # 1.2 MB a message: many frames, many windows
    async with grpcclient.InferenceServerClient(address) as client:
        results = await asyncio.gather(*(client.infer("digits-fp32", digits_input(big), client_timeout=20,
                                                      headers={"x-client-id": f"c{i}"}) for i in range(6)))
        for result in results:
            np.testing.assert_array_equal(result.as_numpy("y"), big * 2)

        async def requests():
            for n in range(4):
                yield {"model_name": "digits-fp32", "inputs": digits_input(big[:, :50_000] * n), "request_id": str(n)}

        replies = [result.get_response().id async for result, error in client.stream_infer(requests())
                   if error is None]
        small = await client.infer("digits-fp32", digits_input(np.ones((1, 3), np.float32)))  # the window held
    assert replies == [str(n) for n in range(4) for _ in range(3)]
    assert small.as_numpy("y").tolist() == [[2.0, 2.0, 2.0]]
    assert set(triton.versions) <= {"1", "2"} and len(triton.versions) == 6 + 4 * 3 + 1  # a stream's: 3 answers each
    assert len(set(triton.versions[6:18])) == 1  # one stream: one version
    assert gw.metrics.requests[(f"grpc:/{SERVICE}/ModelStreamInfer", "OK")] == 1 and gw.guard.in_flight == 0


@pytest.mark.parametrize("proxy", [{"api_keys": [{"name": "ci", "sha256": __import__("hashlib").sha256(
    KEY.encode()).hexdigest()}], "host": "127.0.0.1", "routing_file": "unused"}], indirect=True)
async def test_a_keyed_grpc_client_is_sticky_by_its_key(proxy, tmp_path):
    from serve.gateway.canary import Routing, Split, write_routing

    gw, triton, address = proxy
    gw.routing = Routing(tmp_path / "routing.json")
    write_routing(gw.routing.path, {"digits-fp32": Split(1, 2)}, 50.0)
    gw.routing.refresh()
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        for n in range(30):  # a different client header every call: the key decides
            await client.infer("digits-fp32", digits_input(x), headers={"authorization": f"Bearer {KEY}",
                                                                        "x-client-id": f"c{n}"})
    assert len(set(triton.versions)) == 1 and triton.versions[0] == str(gw.routing.pick("digits-fp32", b"ci")[0])


async def test_with_no_canary_messages_pass_as_they_came_unless_a_switch_is_under_way(canary):
    from serve.gateway.canary import POLL_S, Split, write_routing

    gw, triton, address = canary
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        write_routing(gw.routing.path, {"digits-fp32": Split(1)}, 0.0)  # one version loaded: nothing to choose
        await asyncio.sleep(POLL_S * 1.5)
        await client.infer("digits-fp32", digits_input(x))
        write_routing(gw.routing.path, {"digits-fp32": Split(1)}, 0.0, settling=True)  # a second one may load
        await asyncio.sleep(POLL_S * 1.5)
        await client.infer("digits-fp32", digits_input(x))
    assert triton.versions == ["", "1"]
    assert version_requests(gw) == {("digits-fp32", "1", "stable", 200): 1}


async def test_without_a_routing_file_messages_pass_unversioned(proxy):
    gw, triton, address = proxy
    async with grpcclient.InferenceServerClient(address) as client:
        await client.infer("digits-fp32", digits_input(np.ones((1, 3), np.float32)))
    assert triton.versions == [""] and not gw.metrics.versions


async def test_an_open_stream_follows_a_rollback(canary):
    from serve.gateway.canary import POLL_S, Split, write_routing

    gw, triton, address = canary
    write_routing(gw.routing.path, {"digits-fp32": Split(1, 2)}, 100.0)  # everything to the canary
    answered = asyncio.Event()
    x = np.ones((1, 3), np.float32)
    async with grpcclient.InferenceServerClient(address) as client:
        async def requests():
            await asyncio.sleep(POLL_S * 1.5)  # the gateway has read the new routing
            yield {"model_name": "digits-fp32", "inputs": digits_input(x), "request_id": "before"}
            await answered.wait()
            write_routing(gw.routing.path, {"digits-fp32": Split(1)}, 0.0)  # rolled back while the stream is open
            await asyncio.sleep(POLL_S * 1.5)
            yield {"model_name": "digits-fp32", "inputs": digits_input(x), "request_id": "after"}

        async for result, error in client.stream_infer(requests()):
            assert error is None
            answered.set()
    assert triton.versions == ["2"] * 3 + ["1"] * 3  # the fake answers each message three times
    counts = version_requests(gw)
    assert counts[("digits-fp32", "2", "canary", 200)] == counts[("digits-fp32", "1", "stable", 200)] == 1
