"""Task endpoints: ``/v1/models/{model}:generate`` and ``:score`` (``:predict`` is a fast route)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from serve.gateway import language_model
from serve.gateway.deps import AdmittedDep, GatewayDep

router = APIRouter(prefix="/v1/models", tags=["tasks"])


@router.post("/{model}:generate", summary="Continue a prompt (language-model tasks)",
             response_model=language_model.GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "with stream=true: text deltas as generated, then the summary"}})
async def generate(model: str, request: language_model.GenerateRequest, gw: GatewayDep, caller: AdmittedDep,
                   http: Request):
    """Continue ``prompt``. Named by task, generation runs in Triton's KV-cache model, where the steps of all
    live sequences share batches; named by variant, the context is recomputed for every character."""
    triton_model = gw.task_model(model, "generate")
    scope = version_scope(http, caller)
    if request.stream:  # the in-flight slot is held until the stream ends
        prompt_ids = language_model.check_generate(gw, request)
        events = language_model.generate_events(gw, model, triton_model, request, prompt_ids,
                                                gw.settings.request_timeout_s, scope)
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    async with asyncio.timeout(gw.settings.request_timeout_s):
        return await language_model.generate(gw, model, triton_model, request, scope=scope)


@router.post("/{model}:score", summary="Loss and perplexity of a text (language-model tasks)")
async def score(model: str, request: language_model.ScoreRequest, gw: GatewayDep,
                caller: AdmittedDep, http: Request) -> language_model.ScoreResponse:
    triton_model = gw.task_model(model, "score")
    async with asyncio.timeout(gw.settings.request_timeout_s):
        return await language_model.score(gw, triton_model, request, version_scope(http, caller))


def version_scope(http: Request, caller) -> dict:
    """The request's scope with its caller: what picks its model version in a canary split (sticky per key or
    client header, as on the inference routes), and where the pick is kept for the per-version metrics."""
    http.scope["autoglm.caller"] = caller
    return http.scope
