"""KServe v2 / Open Inference Protocol metadata, health and statistics, relayed from Triton unchanged.

``POST .../infer`` is a fast route (:mod:`serve.gateway.fast_path`). Triton's answers, errors
included, go back with Triton's own status and body, so stock clients (``tritonclient.http``) behave
as they do against Triton. The Triton extensions that cannot work through a network gateway (shared
memory) or that belong to the operator (repository control) are refused with a 4xx saying why and
what to do instead, in the error body every v2 client reads.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from serve.gateway.deps import CallerDep, GatewayDep
from serve.gateway.errors import BadInput
from serve.gateway.worker import MODEL_NAME, Gateway, unknown_model

router = APIRouter(prefix="/v2", tags=["v2"])

SHARED_MEMORY = ("shared memory regions cannot be used through the AutoGLM gateway: a region lives in the memory "
                 "of Triton's host, which a client across the network cannot share; send the tensors in the "
                 "request body instead (binary_data=True in tritonclient), or run the client on Triton's host and "
                 "connect to Triton directly")
REPOSITORY = ("model repository control (index, load, unload) is operator-only and not served by the AutoGLM "
              "gateway: publish models with `python -m serve`, or, as the operator, call Triton's own port "
              "directly; GET /v2/models/<model>/ready tells whether a model is loaded")


async def relay(gw: Gateway, target: str) -> Response:
    """GET ``target`` from Triton and answer with Triton's status, body and content type, unchanged."""
    status, headers, body = gw.relayed(await gw.call(b"GET", target.encode()))
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def _model(model: str, version: str | None = None) -> str:
    if not MODEL_NAME.fullmatch(model):
        raise unknown_model(model)
    if version is not None and not version.isdigit():
        raise BadInput(f"Request for unknown model: '{model}' version {version[:16]} is not found (versions are "
                       f"numbers)", 404)
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


@router.get("/models/stats", summary="Inference statistics of every model (Triton extension)")
async def all_stats(gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, "/v2/models/stats")


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


@router.get("/models/{model}/versions/{version}/stats", summary="Model version statistics (Triton extension)")
async def version_stats(model: str, version: str, gw: GatewayDep, _: CallerDep) -> Response:
    return await relay(gw, _model(model, version) + "/stats")


async def shared_memory(rest: str, _: CallerDep) -> Response:
    raise BadInput(SHARED_MEMORY, 400)


async def repository(rest: str, _: CallerDep) -> Response:
    raise BadInput(REPOSITORY, 403)


# Every path under these prefixes, both methods (Triton's own use GET for status, POST for the rest),
# so that no client of these extensions meets a bare 404.
for _path, _endpoint, _status, _why in (
        ("/systemsharedmemory/{rest:path}", shared_memory, 400, "cannot work through a network gateway"),
        ("/cudasharedmemory/{rest:path}", shared_memory, 400, "cannot work through a network gateway"),
        ("/repository/{rest:path}", repository, 403, "operator-only")):
    for _method in ("GET", "POST"):
        router.add_api_route(_path, _endpoint, methods=[_method], status_code=_status,
                             summary=f"{_path.split('/')[1]} (refused: {_why})",
                             operation_id=f"refuse_{_method.lower()}_{_path.split('/')[1]}")
