"""The serving benchmark's gRPC load: a closed loop of KServe v2 ``ModelInfer`` calls over grpc.aio.

The request is serialized once and sent as bytes (no per-call protobuf work on the client), so the
two cores measure the servers rather than the generator; the same bytes go to Triton direct and to
the gateway's gRPC port, which is what makes their ratio fair.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(model: str, image: np.ndarray) -> bytes:
    """A serialized ``ModelInferRequest`` for one digits image (1, 1, 8, 8) FP32 as raw contents."""
    from tritonclient.grpc import service_pb2 as pb

    x = np.ascontiguousarray(image, np.float32).reshape(1, 1, 8, 8)
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="logits")
    return request.SerializeToString()


async def closed_loop(spec: dict) -> tuple[list[float], float, int, int]:
    """``spec``: target (host:port), body (path of the serialized request), concurrency, duration_s,
    warmup_s; (latencies in s, measured seconds, errors, warm-up requests), as the HTTP generator's."""
    import grpc

    with open(spec["body"], "rb") as f:
        body = f.read()
    latencies: list[float] = []
    errors = warm_requests = 0
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        infer = channel.unary_unary(MODEL_INFER, _registered_method=True)

        async def client(until: float, record: bool):
            nonlocal errors, warm_requests
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    await infer(body, timeout=10)
                    ok = True
                except grpc.aio.AioRpcError:
                    ok = False
                if record:
                    latencies.append(time.perf_counter() - started)
                    errors += not ok
                else:
                    warm_requests += 1

        warm = time.perf_counter() + spec["warmup_s"]
        await asyncio.gather(*[client(warm, False) for _ in range(spec["concurrency"])])
        started = time.perf_counter()
        await asyncio.gather(*[client(started + spec["duration_s"], True) for _ in range(spec["concurrency"])])
        elapsed = time.perf_counter() - started
    return latencies, elapsed, errors, warm_requests
