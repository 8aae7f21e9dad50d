"""The gateway app factory: FastAPI for docs, health, metadata and generation; bare ASGI for the fast routes.

:class:`GatewayApp` answers the fast routes (v2 infer, :predict) itself, before any framework layer;
everything else goes through FastAPI: its error middleware → :class:`RouteMetrics` →
:class:`BodyLimit` → routing. The
Triton pool and all per-worker state are created in ``lifespan``, once per worker process; with a
``shared_dir`` the workers' metrics and rate-limit buckets are the gateway's (see :mod:`serve.gateway.metrics`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from serve.gateway.deps import CallerDep, gateway_of
from serve.gateway.errors import JSONResponse, Refused
from serve.gateway.fast_path import FAST_ROUTES, FastRoute, fast_route, serve_fast
from serve.gateway.grpc_proxy import grpc_service
from serve.gateway.guard import limited
from serve.gateway.openai_schema import openai_error, speaks_openai, validation_error
from serve.gateway.routes import openai, ops, tasks, v2
from serve.gateway.tracing import Tracing
from serve.gateway.worker import Gateway
from serve.settings import GatewaySettings

SETTINGS_ENV = "SERVE_GATEWAY_SETTINGS"  # path of a JSON GatewaySettings, for uvicorn's worker processes
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's variable: the shared_dir where the JSON has none


class BodyLimit:
    """Bounded request bodies for the FastAPI routes: Content-Length checked first, then bytes counted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gw = gateway_of(scope["app"])
        try:
            gw.guard.check_length(dict(scope["headers"]).get(b"content-length"))
        except Refused as refused:
            return await _error(*gw.refusal(refused), scope["path"])(scope, receive, send)
        message = gw.guard.too_large()  # raised as an HTTPException: FastAPI's body parsing lets that one through
        await self.app(scope, limited(receive, gw.settings.max_body_bytes, lambda: HTTPException(413, message)), send)


class RouteMetrics:
    """Requests, status and latency of the FastAPI routes, labelled by route template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, elapsed = scope.get("route"), time.perf_counter() - started
            metrics = gateway_of(scope["app"]).metrics
            metrics.observe(getattr(route, "path", "other"), status, elapsed)
            picked = scope.get("autoglm.version")  # (model, version, role): a generation's canary split
            if picked is not None:
                metrics.observe_version(*picked, status, elapsed)


def _error(status: int, headers, message: str, path: str = "", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    """The gateway's error body, ``{"error": message}``; on the OpenAI paths, OpenAI's error object."""
    body = openai_error(status, message, param, code) if speaks_openai(path) else {"error": message}
    return JSONResponse(body, status_code=status,
                        headers={k.decode(): v.decode() for k, v in headers} if headers else None)


async def _refused(request: Request, exc: Refused | TimeoutError) -> JSONResponse:
    return _error(*gateway_of(request.app).refusal(exc), request.url.path, getattr(exc, "param", None),
                  getattr(exc, "code", None))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    if speaks_openai(request.url.path):  # OpenAI answers 400 where FastAPI would say 422
        message, param = validation_error(exc.errors())
        return _error(400, (), message, request.url.path, param)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in exc.errors())
    status = 400 if any(e["type"] == "json_invalid" for e in exc.errors()) else 422
    return _error(status, (), f"invalid request: {problems}")


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    body = openai_error(exc.status_code, str(exc.detail)) if speaks_openai(request.url.path) else {
        "error": str(exc.detail)}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _documented(route: FastRoute, path: str):
    """A stand-in endpoint whose signature tells FastAPI what ``path`` takes: path parameters, body, API key."""
    def param(name: str, annotation) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)

    params = [param(name, str) for name in re.findall(r"{(\w+)}", path)]
    params += [param("request", route.body), param("_", CallerDep)]

    async def endpoint(**_):
        raise NotImplementedError  # pragma: no cover - documentation only: GatewayApp answers before FastAPI

    endpoint.__signature__ = inspect.Signature(params)
    endpoint.__name__ = route.handler.__name__
    return endpoint


def _fast_route_docs() -> list[APIRoute]:
    """The fast routes as FastAPI would declare them, from :data:`FAST_ROUTES`: for the OpenAPI document only."""
    return [APIRoute(path, _documented(route, path), methods=["POST"], tags=[route.tag], summary=summary,
                     description=route.description, response_model=route.response)
            for route in FAST_ROUTES for path, summary in route.operations]


class GatewayApp(FastAPI):
    """FastAPI with the fast routes dispatched first, as bare ASGI (see :mod:`serve.gateway.fast_path`)."""

    tracing: Tracing | None = None  # set by create_app when serve.gateway.tracing is on

    async def __call__(self, scope, receive, send) -> None:
        route = fast_route(scope)
        if route is None:
            return await super().__call__(scope, receive, send)
        if self.tracing is None:  # the only cost of tracing to the fast routes while it is off
            return await serve_fast(gateway_of(self), route, scope, receive, send)
        await self.tracing.serve(serve_fast, gateway_of(self), route, scope, receive, send)


def access_log(on: bool) -> None:
    """uvicorn's access log (its ``uvicorn.access`` logger) on or off in this worker, whatever uvicorn's own
    flags said: the setting holds wherever the gateway runs (``python -m serve``, a container, uvicorn by hand).
    uvicorn checks the logger for handlers per connection, so off costs nothing per request."""
    logger = logging.getLogger("uvicorn.access")
    if not on:
        logger.handlers, logger.propagate = [], False
        return
    logger.setLevel(logging.INFO)
    if not logger.handlers:  # uvicorn was started with --no-access-log: its default handler and format
        from uvicorn.logging import AccessFormatter

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(AccessFormatter('%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'))
        logger.addHandler(handler)
        logger.propagate = False


def create_app(settings: GatewaySettings | None = None, tracing: Tracing | None = None) -> FastAPI:
    """A gateway app for ``settings``; its Triton pool opens in lifespan (one per worker).

    With ``settings.tracing`` the app exports OpenTelemetry spans through ``tracing`` (by default the OTLP
    pipeline of the ``OTEL_*`` environment, shut down with the app); ``tracing`` given, it is used either way.
    """
    settings = settings or GatewaySettings()
    if tracing is None and settings.tracing:
        tracing = Tracing.from_environment()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.gateway = Gateway(settings, tracing=tracing)
        try:  # gRPC: KServe v2 on its own port, when set; metrics: shared with the other workers, when set
            async with grpc_service(app.state.gateway), app.state.gateway.metrics.publishing():
                yield
        finally:
            await app.state.gateway.aclose()
            if tracing is not None:
                tracing.shutdown()  # exports what is pending (a pipeline built here only)

    # Off: FastAPI's OpenTelemetry probe costs ≈20 µs per request, and our Prometheus metrics count requests.
    telemetry = tracing.fastapi_telemetry() if tracing else {"tracing": False, "metrics": False, "logs": False}
    app = GatewayApp(title="AutoGLM gateway", version="1", lifespan=lifespan, telemetry=telemetry,
                  description="KServe v2 passthrough to Triton, task endpoints, health and metrics. "
                              "Errors are JSON: {\"error\": \"...\"} (OpenAI's error object on the OpenAI "
                              "routes).")
    app.state.settings = settings
    app.tracing = tracing
    for router in (v2.router, tasks.router, openai.router, ops.router):
        app.include_router(router)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(TimeoutError, _refused)
    app.add_middleware(BodyLimit)
    app.add_middleware(RouteMetrics)  # added last: outermost, so it sees BodyLimit's 413s too

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=[*_fast_route_docs(), *app.routes])
        return app.openapi_schema

    app.openapi = openapi
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings from the JSON file named by $SERVE_GATEWAY_SETTINGS.

    Running ``uvicorn --workers N`` by hand, set $PROMETHEUS_MULTIPROC_DIR to an empty directory of this
    host (emptied before each start) for metrics and rate limits of the whole gateway, as the runner does.
    """
    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start the gateway with `python -m serve`")
    settings = GatewaySettings.model_validate_json(Path(path).read_text())
    if settings.shared_dir is None and os.environ.get(MULTIPROC_ENV):
        settings = settings.model_copy(update={"shared_dir": Path(os.environ[MULTIPROC_ENV])})
    access_log(settings.access_log)
    return create_app(settings)
