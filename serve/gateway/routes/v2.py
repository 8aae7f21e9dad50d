"""KServe v2 / Open Inference Protocol metadata and health, relayed from Triton.

``POST .../infer`` is a fast route (:mod:`serve.gateway.fast_path`). Triton's repository (load/unload)
API is deliberately not exposed: model control belongs to the operator.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

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
