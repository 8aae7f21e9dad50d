"""Operations: liveness, readiness (Triton ready and the models loaded), Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serve.gateway.deps import GatewayDep
from serve.gateway.errors import JSONResponse, Refused

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The gateway process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Triton is ready and the task's models are loaded")
async def readyz(gw: GatewayDep) -> JSONResponse:
    models = sorted(set(gw.catalog.models.values())) if gw.catalog else []
    try:
        triton = (await gw.call(b"GET", b"/v2/health/ready")).status == 200
        states = {m: (await gw.call(b"GET", f"/v2/models/{m}/ready".encode())).status == 200 for m in models}
    except Refused as refused:
        return JSONResponse({"ready": False, "triton": False, "reason": str(refused)}, status_code=503)
    ready = triton and all(states.values())
    return JSONResponse({"ready": ready, "triton": triton, "models": states}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics of this worker")
async def metrics(gw: GatewayDep) -> Response:
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
