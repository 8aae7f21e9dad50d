"""Operations: liveness, readiness (Triton ready and the models loaded), Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serve.gateway.deps import GatewayDep
from serve.gateway.errors import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The gateway process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Triton is ready and the task's models are loaded")
async def readyz(gw: GatewayDep) -> JSONResponse:
    status, body = await gw.readiness()
    return JSONResponse(body, status_code=status)


@router.get("/metrics", summary="Prometheus metrics of the gateway (all its workers)")
async def metrics(gw: GatewayDep) -> Response:
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
