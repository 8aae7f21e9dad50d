"""One gateway worker's state: settings, upstream pool, guard, metrics, model signatures, task catalog.

Created in the app's lifespan (one per worker process) and reached through ``app.state.gateway``.
Every call to Triton goes through :meth:`Gateway.call`, which turns transport failures into the
gateway's own answers: no connection → 503, a broken reply → 502, no reply within
``request_timeout_s`` → TimeoutError (the routes answer 504). Triton's own answers are relayed
unchanged on the v2 routes (:meth:`Gateway.relayed`, so stock clients see Triton's text); the task
routes explain them instead (:meth:`Gateway.upstream_failure`: 503 when full, other 5xx → 502).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import numpy as np
import orjson

from serve.gateway.canary import Routing
from serve.gateway.catalog import VERBS, TaskCatalog
from serve.gateway.errors import BadInput, Refused
from serve.gateway.guard import Guard
from serve.gateway.metrics import GatewayMetrics
from serve.gateway.tensors import ModelSignature, decode_response, encode_request
from serve.gateway.tracing import Tracing
from serve.gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamUnavailable
from serve.settings import GatewaySettings

MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
JSON = (b"content-type", b"application/json")
READY_TTL_S = 1.0  # /readyz asks Triton at most this often (probes ask every few seconds)


class Gateway:
    """What every route of one worker shares."""

    def __init__(self, settings: GatewaySettings, pool: UpstreamPool | None = None,
                 catalog: TaskCatalog | None = None, tracing: Tracing | None = None):
        self.settings, self.tracing = settings, tracing
        self.pool = pool or UpstreamPool(*settings.upstream_address, size=settings.pool_size,
                                         connect_timeout_s=settings.connect_timeout_s)
        if tracing is not None:  # every call to Triton a CLIENT span, its traceparent sent along
            self.pool = tracing.traced_pool(self.pool, settings.upstream_address)
        self.catalog = catalog if catalog is not None else (
            TaskCatalog.load(settings.repository) if settings.repository else None)
        # metrics first: they check shared_dir, which the guard's shared buckets use too
        self.metrics = GatewayMetrics(lambda: self.guard.in_flight, settings.watts_per_core, settings.shared_dir,
                                      routing=lambda: self.routing.state)
        self.guard = Guard(settings)
        self.routing = Routing(settings.routing_file, settings.client_header)
        self.signatures: dict[str, ModelSignature] = {}
        self.ready_ttl_s = READY_TTL_S
        self._ready: tuple[float, tuple[int, dict]] | None = None
        self._ready_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self.pool.aclose()
        self.guard.close()

    async def readiness(self) -> tuple[int, dict]:
        """(status, body) of ``/readyz``: Triton ready and every model of the task loaded.

        The route is open to probes without a key, so however many ask, Triton is asked (1 + one call per
        model, concurrently) at most once per ``ready_ttl_s``: callers in the meantime share that answer.
        """
        async with self._ready_lock:
            if self._ready is not None and time.monotonic() - self._ready[0] < self.ready_ttl_s:
                return self._ready[1]
            answer = await self._check_ready()
            self._ready = (time.monotonic(), answer)
            return answer

    async def _check_ready(self) -> tuple[int, dict]:
        models = sorted(set(self.catalog.models.values())) if self.catalog else []
        try:
            replies = await asyncio.gather(self.call(b"GET", b"/v2/health/ready"),
                                           *(self.call(b"GET", f"/v2/models/{m}/ready".encode()) for m in models))
        except Refused as refused:
            return 503, {"ready": False, "triton": False, "reason": str(refused)}
        triton = replies[0].status == 200
        states = {m: r.status == 200 for m, r in zip(models, replies[1:], strict=True)}
        ready = triton and all(states.values())
        return 200 if ready else 503, {"ready": ready, "triton": triton, "models": states}

    def refusal(self, exc: Refused | TimeoutError) -> tuple[int, tuple[tuple[bytes, bytes], ...], str]:
        """(status, extra headers, message) answering a request refused or timed out, on either path;
        a request shed to protect the service is counted."""
        if isinstance(exc, TimeoutError):
            return 504, (), f"no answer within the gateway's request timeout of {self.settings.request_timeout_s:g} s"
        if exc.shed:
            self.metrics.shed_one(exc.shed)
        return exc.status, exc.headers, str(exc)

    # ---- talking to Triton -------------------------------------------------------------------------
    async def call(self, method: bytes, target: bytes, body: bytes = b"",
                   headers: list[tuple[bytes, bytes]] | tuple = ()) -> UpstreamResponse:
        """One request to Triton; transport failures become Refused(503/502)."""
        try:
            return await self.pool.request(method, target, body, headers, self.settings.request_timeout_s)
        except UpstreamError as exc:
            raise self._transport_failure(exc) from None
        except TimeoutError:
            self.metrics.triton_error("timeout")
            raise

    def upstream_failure(self, response: UpstreamResponse) -> Refused | None:
        """None for Triton's 2xx/4xx (passed through as is); Refused(503/502) for its 5xx."""
        if response.status < 500:
            return None
        message = _triton_message(response.body)
        if response.status == 503:  # Triton's queue is full (max_queue_size) or it is shutting down
            self.metrics.triton_error("overloaded")
            return Refused(503, f"Triton is overloaded: {message}",
                           ((b"retry-after", str(self.settings.retry_after_s).encode()),))
        self.metrics.triton_error("status_5xx")
        return Refused(502, f"Triton failed ({response.status}): {message}")

    async def signature(self, model: str) -> ModelSignature:
        """The model's inputs and batch limit, from Triton's config (cached); 404 for an unknown model."""
        sig = self.signatures.get(model) or await self.find_signature(model)
        if isinstance(sig, ModelSignature):
            return sig
        failure = self.upstream_failure(sig)
        if failure:
            raise failure
        known = f"; task endpoints serve {self.catalog.names}" if self.catalog else ""
        raise BadInput(f"unknown model '{model}' (Triton: {_triton_message(sig.body)}){known}", 404)

    async def find_signature(self, model: str) -> ModelSignature | UpstreamResponse:
        """The model's signature from Triton's config (then cached), or Triton's answer refusing the config
        (unknown model, not ready), for the caller to relay or explain; an invalid name is refused here."""
        sig = self.signatures.get(model)
        if sig is not None:
            return sig
        if not MODEL_NAME.fullmatch(model):
            raise unknown_model(model)
        response = await self.call(b"GET", b"/v2/models/%s/config" % model.encode())
        if response.status != 200:
            return response
        sig = self.signatures[model] = ModelSignature.from_config(orjson.loads(response.body))
        return sig

    def relayed(self, response: UpstreamResponse) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
        """(status, headers, body) relaying Triton's answer on a v2 route unchanged, errors included, so
        stock clients see Triton's own status and text; its 5xx are counted. Only the end-to-end headers
        that describe the body go back: hop-by-hop ones (Connection, Keep-Alive, ...) stay behind."""
        if response.status >= 500:
            self.metrics.triton_error("overloaded" if response.status == 503 else "status_5xx")
        got = response.headers
        out = [(b"content-type", got.get(b"content-type", b"application/json"))]
        for name in (b"inference-header-content-length", b"content-encoding", b"accept-encoding"):
            if name in got:
                out.append((name, got[name]))
        return response.status, tuple(out), response.body

    def version_for(self, model: str, scope: dict, headers: dict | None = None) -> int | None:
        """The version of ``model`` this request goes to (None: unversioned, no routing for it), kept in ``scope``
        for the per-version metrics. Sticky per client: its API key's name where keys are set, else the client
        header (``headers``: the scope's, as a dict)."""
        headers = dict(scope["headers"]) if headers is None else headers
        caller = scope.get("autoglm.caller")
        client = caller.name.encode() if caller is not None and caller.name != "anonymous" else \
            headers.get(self.routing.client_header)
        picked = self.routing.pick(model, client)
        if picked is None:
            return None
        scope["autoglm.version"] = (model, *picked)
        return picked[0]

    def target(self, model: str, verb: bytes, version: int | None = None) -> bytes:
        """``/v2/models/<model>[/versions/<v>]/<verb>``: with a routing, the stable version unless ``version``
        names another (Triton would send an unversioned request to the highest version loaded: a canary)."""
        version = version or self.routing.stable(model)
        if version is None:
            return b"/v2/models/%s/%s" % (model.encode(), verb)
        return b"/v2/models/%s/versions/%d/%s" % (model.encode(), version, verb)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...],
                    version: int | None = None) -> dict[str, np.ndarray]:
        """Run ``model`` (``version``; by default the stable one) on named arrays through Triton's binary
        protocol; named output arrays back."""
        body, header_length = encode_request(inputs, outputs)
        response = await self.call(b"POST", self.target(model, b"infer", version), body,
                                   [(b"Inference-Header-Content-Length", str(header_length).encode())])
        if response.status != 200:
            failure = self.upstream_failure(response)
            raise failure or Refused(response.status, f"Triton refused the request: {_triton_message(response.body)}")
        try:
            return decode_response(response.body, response.headers.get(b"inference-header-content-length"))
        except Refused:
            self.metrics.triton_error("bad_response")
            raise

    async def stream(self, model: str, payload: dict, version: int | None = None) -> AsyncIterator[dict]:
        """Triton's ``generate_stream`` for ``model`` (``version``; by default the stable one): each Server-Sent
        Event's JSON, as it arrives.

        Refused before the first event maps like :meth:`call` (Triton's 400 -> 422 naming the input,
        unless the model failed; a full model -> 503); an error event mid-stream raises Refused(502); a
        reply that is not a well-formed event stream (a malformed event, one cut off) raises Refused(502).
        """
        target = self.target(model, b"generate_stream", version)
        timeout = self.settings.request_timeout_s
        try:
            async with self.pool.stream(b"POST", target, orjson.dumps(payload), (JSON,), timeout) as reply:
                if reply.status != 200:  # refused before any response: an error body (JSON, or one event)
                    body = b"".join([chunk async for chunk in reply.body(timeout)])
                    raise self._stream_failure(reply.status, _triton_message(body.strip().removeprefix(b"data:")))
                pending = b""
                async for chunk in reply.body(timeout):
                    pending += chunk
                    *events, pending = pending.split(b"\n\n")
                    for event in events:
                        data = b"".join(line[5:] for line in event.split(b"\n") if line.startswith(b"data:"))
                        if not data:
                            continue
                        try:
                            message = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            message = None
                        if not isinstance(message, dict):
                            raise UpstreamError(f"Triton sent a malformed event: {data[:120]!r}")
                        if "error" in message:
                            raise self._stream_failure(reply.status, str(message["error"]))
                        yield message
                if pending.strip():
                    raise UpstreamError("Triton's event stream ended inside an event")
        except UpstreamError as exc:
            raise self._transport_failure(exc) from None

    def _transport_failure(self, exc: UpstreamError) -> Refused:
        """No connection -> 503 + Retry-After; a broken reply -> 502."""
        if isinstance(exc, UpstreamUnavailable):
            self.metrics.triton_error("unavailable")
            return Refused(503, f"Triton is unavailable ({exc}); retry shortly",
                           ((b"retry-after", str(self.settings.retry_after_s).encode()),))
        self.metrics.triton_error("bad_response")
        return Refused(502, f"Triton failed: {exc}")

    def _stream_failure(self, status: int, message: str) -> Refused:
        if "retry later" in message or status == 503:  # the generation model's waiting queue is full
            self.metrics.triton_error("overloaded")
            return Refused(503, f"Triton is overloaded: {message}",
                           ((b"retry-after", str(self.settings.retry_after_s).encode()),))
        if "unknown model" in message or "not ready" in message:  # unloaded, or restarting: not the client's fault
            self.metrics.triton_error("unavailable")
            return Refused(503, f"the generation model is not available: {message}; retry shortly",
                           ((b"retry-after", str(self.settings.retry_after_s).encode()),))
        if status == 400 and "generation failed" not in message:  # the model's checks of the request
            return BadInput(f"Triton refused the request: {message}", 422)
        # Triton answers 400 for any error in the first response: the model's own failures are 502 too
        self.metrics.triton_error("status_5xx")
        return Refused(502, f"generation failed: {message}")

    # ---- task endpoints ----------------------------------------------------------------------------
    def task_model(self, name: str, verb: str) -> str:
        """The Triton model behind ``/v1/models/<name>:<verb>``; 404 naming what exists otherwise."""
        if self.catalog is None:
            raise BadInput("task endpoints need the repository's task.json: start the gateway with "
                           "`python -m serve --run <run>` (or set repository)", 404)
        model = self.catalog.resolve(name)
        if model is None:
            raise BadInput(f"unknown model '{name}': task endpoints serve {self.catalog.names}", 404)
        verbs = VERBS.get(self.catalog.kind, ())
        if model == self.catalog.generate:
            verbs = ("generate",)
        if verb not in verbs:
            offered = " and ".join(f":{v}" for v in verbs) or "only the v2 endpoints"
            raise BadInput(f"model '{name}' ({self.catalog.task}) answers {offered}, not :{verb}", 404)
        return model


def unknown_model(name: str) -> BadInput:
    """The refusal of a model name no Triton model can have, in Triton's own wording for an unknown
    model (stock clients look for it), then the rule it breaks."""
    return BadInput(f"Request for unknown model: '{name[:128]}' is not found (model names are letters, digits, "
                    f"'_', '.' and '-')", 404)


def _triton_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or "(empty reply)"
