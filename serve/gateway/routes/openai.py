"""The OpenAI-compatible API: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST /v1/chat/completions``.

Same API keys, rate limits, in-flight bound and metrics as every route (a stream holds its in-flight
slot until its last event); errors are OpenAI's error object (see :mod:`serve.gateway.openai_schema`).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from serve.gateway import language_model, openai_api
from serve.gateway.deps import AdmittedDep, CallerDep, GatewayDep
from serve.gateway.openai_schema import BadParam, ChatCompletionRequest, CompletionRequest, Sampling
from serve.gateway.routes.tasks import version_scope

router = APIRouter(prefix="/v1", tags=["openai"])
STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "with stream=true: OpenAI's chunks as Server-Sent Events, then data: [DONE]"}}


@router.get("/models", summary="The models that generate text (OpenAI)")
async def models(gw: GatewayDep, _: CallerDep) -> dict:
    return openai_api.model_list(gw)


@router.get("/models/{model}", summary="One model that generates text (OpenAI)")
async def model(model: str, gw: GatewayDep, _: CallerDep) -> dict:
    return openai_api.model_card(gw, model)


@router.post("/completions", summary="Continue a prompt (OpenAI)", responses=STREAMED)
async def completions(request: CompletionRequest, gw: GatewayDep, caller: AdmittedDep, http: Request):
    """OpenAI's legacy completions. ``prompt`` is a string or a list of one string; ``max_tokens`` defaults
    to OpenAI's 16. Token counts are the model's tokens (characters for charlm); a prompt past the model's
    context is refused (400 ``context_length_exceeded``)."""
    model = openai_api.triton_model(gw, request.model)
    gen, ids = openai_api.generation(gw, request, request.prompt, "prompt", request.max_tokens,
                                     openai_api.COMPLETION_MAX_TOKENS)
    return await _answer(gw, request, model, gen, ids, False, version_scope(http, caller))


@router.post("/chat/completions", summary="Answer a conversation (OpenAI)", responses=STREAMED)
async def chat_completions(request: ChatCompletionRequest, gw: GatewayDep, caller: AdmittedDep, http: Request):
    """OpenAI's chat completions. Messages become one prompt through the model's chat template, or the
    gateway's plain template (README: OpenAI-compatible API); ``max_tokens`` (or ``max_completion_tokens``)
    defaults to the gateway's limit, ``serve.gateway.max_new_tokens``."""
    model = openai_api.triton_model(gw, request.model)
    if request.max_tokens and request.max_completion_tokens and request.max_tokens != request.max_completion_tokens:
        raise BadParam("max_completion_tokens", "max_tokens and max_completion_tokens differ: send one")
    prompt, turn_stops = openai_api.chat_prompt(gw, request)
    gen, ids = openai_api.generation(gw, request, prompt, "messages",
                                     request.max_completion_tokens or request.max_tokens, gw.settings.max_new_tokens,
                                     turn_stops, special_tokens=not gw.catalog.metadata.get("chat_template"))
    return await _answer(gw, request, model, gen, ids, True, version_scope(http, caller))


async def _answer(gw, request: Sampling, model: str, gen: language_model.GenerateRequest, ids, chat: bool,
                  scope: dict):
    timeout = gw.settings.request_timeout_s
    if request.stream:  # the in-flight slot is held until the stream ends
        usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = openai_api.completion_chunks(gw, request.model, model, gen, ids, chat, usage, timeout, scope)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    async with asyncio.timeout(timeout):
        reply = await language_model.generate(gw, request.model, model, gen, ids, scope)
    return openai_api.completion_body(request.model, chat, reply, len(ids))
