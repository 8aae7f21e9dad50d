"""The fast routes: v2 ``infer`` and ``:predict``, answered as bare ASGI in front of FastAPI's routing.

FastAPI's dependency and validation machinery costs ≈150-180 µs per request and Starlette's routing
≈90 µs more than bare ASGI (measured on this 2-core class of host, where Triton's own work is
≈420 µs); those microseconds come straight out of Triton's throughput. So these routes are matched
by the fixed ends of their paths before any framework layer and handled with plain functions;
everything else (docs, health, metadata, generation) falls through to FastAPI (see
``GatewayApp.__call__``). :data:`FAST_ROUTES` is the one table of them: the dispatch here and their
OpenAPI operations (built in :mod:`serve.gateway.app`) both come from it. The same guard, limits and
metrics apply to both paths, and tests still swap the :class:`Gateway` through
``app.dependency_overrides[get_gateway]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from serve.gateway.canary import PINNED
from serve.gateway.compression import inflate, response_coding
from serve.gateway.errors import BadInput, Refused, error_body
from serve.gateway.guard import read_body
from serve.gateway.predict import PredictRequest, PredictResponse, predict
from serve.gateway.tensors import InferRequest, InferResponse, ModelSignature, validate
from serve.gateway.worker import JSON, MODEL_NAME, Gateway, unknown_model

log = logging.getLogger("serve.gateway")
# (gateway, its route, scope, headers, body) -> (status, headers, body)
Handler = Callable[[Gateway, "FastRoute", dict, dict, bytes], Awaitable[tuple[int, tuple, bytes]]]


@dataclass(frozen=True)
class FastRoute:
    """A POST route answered before FastAPI, matched by the fixed start and end of its path template.

    ``path`` is its OpenAPI template and the route label of its metrics; ``also`` lists further
    templates (with their summaries) that the same handler answers under the same label.
    """

    path: str
    handler: Handler
    body: type[BaseModel]  # what the request body holds
    response: type[BaseModel]
    tag: str
    summary: str
    description: str
    also: tuple[tuple[str, str], ...] = ()
    prefix: str = field(init=False)
    suffix: str = field(init=False)

    def __post_init__(self) -> None:
        prefix, suffix = self.path[:self.path.index("{")], self.path[self.path.rindex("}") + 1:]
        for path, _ in self.also:
            if not (path.startswith(prefix) and path.endswith(suffix)):
                raise ValueError(f"{path} does not start with {prefix!r} and end with {suffix!r} as {self.path} "
                                 f"does: give it a FastRoute of its own")
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "suffix", suffix)

    @property
    def operations(self) -> tuple[tuple[str, str], ...]:
        """(path template, summary) of every path this route answers."""
        return ((self.path, self.summary), *self.also)


async def respond(send, status: int, headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def serve_fast(gw: Gateway, route: FastRoute, scope, receive, send) -> None:
    """``route``'s handler within the guard's admission, the body limit and the timeouts; then metrics."""
    started = time.perf_counter()
    headers = dict(scope["headers"])
    try:
        scope["autoglm.caller"] = gw.guard.admit(headers.get(b"authorization"), (scope.get("client") or ("",))[0],
                                                 headers.get(b"content-length"))
        try:
            body = await read_body(receive, gw.settings.max_body_bytes, gw.guard.too_large(),
                                   gw.settings.request_timeout_s)
            coding = headers.get(b"content-encoding")
            if coding is not None:  # the only cost to uncompressed requests: this look-up
                body = inflate(body, coding, gw.settings.max_body_bytes, gw.guard.too_large())
            status, out_headers, payload = await route.handler(gw, route, scope, headers, body)
        finally:
            gw.guard.release()
    except (Refused, TimeoutError) as exc:
        status, extra, message = gw.refusal(exc)
        out_headers, payload = (JSON, *extra), error_body(message)
    except Exception:  # a bug of ours, not the client's: logged, answered 500, the worker keeps serving
        log.exception("%s failed", route.path)
        status, out_headers, payload = 500, (JSON,), error_body("internal error in the gateway (logged)")
    await respond(send, status, out_headers, payload)
    elapsed = time.perf_counter() - started
    gw.metrics.observe(route.path, status, elapsed)
    picked = scope.get("autoglm.version")  # (model, version, role) where a routing chose the version
    if picked is not None:
        gw.metrics.observe_version(*picked, status, elapsed)


def _model_from_path(route: FastRoute, path: str) -> tuple[str, int | None]:
    """``/v2/models/<m>[/versions/<v>]/infer`` -> (model, the version the client named or None)."""
    parts = path[len(route.prefix):].split("/")
    if len(parts) == 2 or (len(parts) == 4 and parts[1] == "versions" and parts[2].isdigit()):
        if not MODEL_NAME.fullmatch(parts[0]):  # never put such a name into the request to Triton
            raise unknown_model(parts[0])
        return parts[0], int(parts[2]) if len(parts) == 4 else None
    raise BadInput(f"no such endpoint {path}: use /v2/models/<model>[/versions/<n>]/infer", 404)


async def infer_passthrough(gw: Gateway, route: FastRoute, scope, headers: dict, body: bytes):
    """Validate against the model's config, forward the body bytes, relay Triton's answer unchanged.

    A compressed request arrives here inflated (:func:`serve_fast`) and goes to Triton uncompressed;
    a client's ``Accept-Encoding`` is asked of Triton as the coding Triton itself would pick, and
    Triton's compressed reply is relayed with its ``Content-Encoding``.
    """
    model, version = _model_from_path(route, scope["path"])
    if version is None:  # the routing's choice (a canary split), else unversioned as the client asked
        target = gw.target(model, b"infer", gw.version_for(model, scope, headers))
    else:  # a client that names a version gets it (counted per version where a routing is on)
        target = scope["path"].encode()
        if gw.routing.path is not None:
            scope["autoglm.version"] = (model, version, PINNED)
    sig = gw.signatures.get(model) or await gw.find_signature(model)
    if not isinstance(sig, ModelSignature):  # Triton's own answer about the model (unknown, not ready)
        return gw.relayed(sig)
    header_length = headers.get(b"inference-header-content-length")
    gw.metrics.observe_rows(route.path, validate(sig, body, header_length))
    forward = [(b"Content-Type", headers.get(b"content-type", b"application/json"))]
    if header_length is not None:
        forward.append((b"Inference-Header-Content-Length", header_length))
    accept = headers.get(b"accept-encoding")
    if accept is not None and (coding := response_coding(accept)):
        forward.append((b"Accept-Encoding", coding))
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    return gw.relayed(await gw.call(b"POST", target, body, forward))


FAST_ROUTES = (
    FastRoute("/v2/models/{model}/infer", infer_passthrough, InferRequest, InferResponse, tag="v2",
              summary="Inference (JSON or binary tensors)",
              description="Validated against the model's config, then forwarded to Triton unchanged (JSON or binary).",
              also=(("/v2/models/{model}/versions/{version}/infer", "Inference on one model version"),)),
    FastRoute("/v1/models/{model}:predict", predict, PredictRequest, PredictResponse, tag="tasks",
              summary="Predict (any task: KServe v1 instances, TF-Serving inputs; images for classification)",
              description="``{\"instances\": [row, ...]}`` -> ``{\"predictions\": [...]}``, one per instance, for "
                          "any task, a user's own included: rows of the model's input tensors as its io spec "
                          "gives them (a bare value for a one-input model, an object {input: value} otherwise); "
                          "``{\"inputs\": {input: rows}}`` -> ``{\"outputs\": ...}`` (TF-Serving's columnar "
                          "form). Classification tasks also take raw 8x8 digit images (pixels 0..16), "
                          "``{\"images\": [...]}``, and answer the class label and its probabilities per image; "
                          "language models take rows of token ids.\n\n``model`` is the task name (its "
                          "recommended variant), a variant name, or a Triton model name."),
)


def fast_route(scope) -> FastRoute | None:
    """The fast route answering ``scope``; None when FastAPI answers it."""
    if scope["type"] == "http" and scope["method"] == "POST":
        return fast_route_of(scope["path"])
    return None


def fast_route_of(path: str) -> FastRoute | None:
    """The fast route answering a POST to ``path``; None when FastAPI answers it."""
    for route in FAST_ROUTES:
        if path.startswith(route.prefix) and path.endswith(route.suffix):
            return route
    return None
