"""FastAPI dependencies, as ``Annotated`` aliases; tests swap them with ``app.dependency_overrides``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.gateway.guard import Caller
from serve.gateway.worker import Gateway

_bearer = HTTPBearer(auto_error=False, description="an API key; optional when the gateway binds loopback only")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]  # puts the key in the OpenAPI document


async def get_gateway(request: Request) -> Gateway:
    """This worker's Gateway (created in the app's lifespan). Dependencies here are ``async def``: FastAPI
    would run plain ``def`` ones in its thread pool, a thread hop per request for work that never blocks."""
    return request.app.state.gateway


def gateway_of(app) -> Gateway:
    """The Gateway for bare-ASGI code, honouring ``app.dependency_overrides[get_gateway]``."""
    override = app.dependency_overrides.get(get_gateway)
    return override() if override is not None else app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _credentials(request: Request) -> tuple[bytes | None, str]:
    header = request.headers.get("authorization")
    return header.encode() if header is not None else None, request.client.host if request.client else ""


async def authorize(request: Request, gw: GatewayDep, _: Bearer) -> Caller:
    """The API key's owner (401 without a valid key where keys are set), within its rate limit (429)."""
    return gw.guard.check(*_credentials(request))


CallerDep = Annotated[Caller, Depends(authorize)]


async def admit(request: Request, gw: GatewayDep, _: Bearer) -> AsyncIterator[Caller]:
    """The guard's admission, as on the fast routes: key (401), rate (429), then one of the worker's
    in-flight slots (503 + Retry-After), held until the answer is done (a stream's last event)."""
    caller = gw.guard.admit(*_credentials(request))
    try:
        yield caller
    finally:
        gw.guard.release()


AdmittedDep = Annotated[Caller, Depends(admit)]
