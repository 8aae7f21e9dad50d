"""KServe v2 / Open Inference Protocol metadata and health, relayed from Triton.

``POST .../infer`` is a hot route served in :mod:`serve.gateway.hot`; it is documented here. Triton's
repository (load/unload) API is deliberately not exposed: model control belongs to the operator.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from serve.gateway.deps import CallerDep, GatewayDep
from serve.gateway.errors import BadInput
from serve.gateway.worker import MODEL_NAME, Gateway

router = APIRouter(prefix="/v2", tags=["v2"])


async def relay(gw: Gateway, target: str) -> Response:
    """GET ``target`` from Triton and answer with its status and body (5xx mapped to 502/503)."""
    response = await gw.call(b"GET", target.encode())
    failure = gw.upstream_failure(response)
    if failure:
        raise failure
    media = response.headers.get(b"content-type", b"application/json").decode()
    return Response(response.body, status_code=response.status, media_type=media)


def _model(model: str, version: str | None = None) -> str:
    if not MODEL_NAME.fullmatch(model) or (version is not None and not version.isdigit()):
        raise BadInput(f"unknown model {model[:64]!r}" + (f" version {version[:16]!r}" if version else ""), 404)
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


@router.get("", summary="Server metadata")
async def server_metadata(gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, "/v2")


@router.get("/health/live", summary="Triton is live")
async def live(gw: GatewayDep) -> Response:
    return await relay(gw, "/v2/health/live")


@router.get("/health/ready", summary="Triton is ready")
async def ready(gw: GatewayDep) -> Response:
    return await relay(gw, "/v2/health/ready")


@router.get("/models/{model}", summary="Model metadata")
async def model_metadata(model: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model))


@router.get("/models/{model}/versions/{version}", summary="Model version metadata")
async def version_metadata(model: str, version: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model, version))


@router.get("/models/{model}/ready", summary="Model is ready")
async def model_ready(model: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model) + "/ready")


@router.get("/models/{model}/versions/{version}/ready", summary="Model version is ready")
async def version_ready(model: str, version: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model, version) + "/ready")


@router.get("/models/{model}/config", summary="Model configuration (Triton extension)")
async def model_config(model: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model) + "/config")


@router.get("/models/{model}/stats", summary="Model statistics (Triton extension)")
async def model_stats(model: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model) + "/stats")


# ---- documentation of the hot route (served in serve.gateway.hot) ---------------------------------
class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(examples=["FP32"])
    data: list[Any] | None = Field(None, description="row-major values; omit when binary_data_size is given")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for binary tensors')


class InferRequest(BaseModel):
    """KServe v2 inference request. With the binary extension, the body is this JSON followed by raw
    tensor bytes, and the ``Inference-Header-Content-Length`` header gives the JSON's length."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor]
    outputs: list[dict[str, Any]] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    outputs: list[InferTensor]


async def infer_doc(model: str, request: InferRequest, _: CallerDep) -> InferResponse:
    """Validated against the model's config, then forwarded to Triton unchanged (JSON or binary)."""
    raise NotImplementedError  # pragma: no cover - served by serve.gateway.hot


async def infer_version_doc(model: str, version: str, request: InferRequest, _: CallerDep) -> InferResponse:
    """Inference on one model version."""
    raise NotImplementedError  # pragma: no cover - served by serve.gateway.hot
