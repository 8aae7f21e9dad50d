"""The serving benchmark's gRPC load: KServe v2 ``ModelInfer`` calls over grpc.aio, for its closed loop.

The request is serialized once and sent as bytes (no per-call protobuf work on the client), so the
two cores measure the servers rather than the generator; the same bytes go to Triton direct and to
the gateway's gRPC port, which is what makes their ratio fair.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

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


@asynccontextmanager
async def infer_call(spec: dict) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """One call of ``spec['body']`` (a serialized request) to ``spec['target']`` (host:port); True when OK."""
    import grpc

    with open(spec["body"], "rb") as f:
        body = f.read()
    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        infer = channel.unary_unary(MODEL_INFER, _registered_method=True)

        async def call() -> bool:
            try:
                await infer(body, timeout=10)
                return True
            except grpc.aio.AioRpcError:
                return False

        yield call
