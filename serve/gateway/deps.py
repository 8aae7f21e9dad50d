"""FastAPI dependencies, as ``Annotated`` aliases; tests swap them with ``app.dependency_overrides``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.gateway.guard import Caller
from serve.gateway.worker import Gateway

_bearer = HTTPBearer(auto_error=False, description="an API key; optional when the gateway binds loopback only")


async def get_gateway(request: Request) -> Gateway:
    """This worker's Gateway (created in the app's lifespan). Dependencies here are ``async def``: FastAPI
    would run plain ``def`` ones in its thread pool, a thread hop per request for work that never blocks."""
    return request.app.state.gateway


def gateway_of(app) -> Gateway:
    """The Gateway for bare-ASGI code, honouring ``app.dependency_overrides[get_gateway]``."""
    override = app.dependency_overrides.get(get_gateway)
    return override() if override is not None else app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def authorize(request: Request, gw: GatewayDep,
              _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """The API key's owner (401 without a valid key where keys are set), within its rate limit (429)."""
    header = request.headers.get("authorization")
    client = request.client.host if request.client else ""
    return gw.guard.check(header.encode() if header is not None else None, client)


CallerDep = Annotated[Caller, Depends(authorize)]


async def in_flight_slot(gw: GatewayDep) -> AsyncIterator[None]:
    """Hold one of the worker's in-flight slots for the request (503 + Retry-After when none is free)."""
    gw.guard.admit()
    try:
        yield
    finally:
        gw.guard.release()


Slot = Annotated[None, Depends(in_flight_slot)]
