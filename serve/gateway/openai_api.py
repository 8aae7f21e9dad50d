"""OpenAI-compatible generation: an OpenAI request becomes a :class:`GenerateRequest` and runs through the
very decoding of ``:generate`` (Triton's KV-cache model, whose in-flight batching both APIs share);
only the bodies differ.

Chat prompts use the tokenizer's chat template (``chat_template`` in the task's metadata, Jinja as
transformers renders it) where the model has one; otherwise :func:`plain_chat_prompt`, the play-script
form a character model like charlm learnt from::

    SYSTEM:\\n<system or developer message>\\n\\n
    USER:\\n<user message>\\n\\n
    ASSISTANT:\\n<assistant message>\\n\\n
    ...
    ASSISTANT:\\n                      <- the reply continues from here

and the reply ends at its turn's end (a blank line, ``finish_reason: "stop"``), as a tokenizer's
model ends at its end-of-turn token.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import orjson

from serve.gateway import language_model
from serve.gateway.catalog import VERBS
from serve.gateway.errors import BadInput, Refused
from serve.gateway.language_model import GenerateRequest, GenerateResponse
from serve.gateway.openai_schema import (SEED_RANGE, BadParam, ChatCompletionRequest, ChatMessage, Sampling,
                                         openai_error)
from serve.gateway.worker import Gateway

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the gateway's limit
PLAIN_ROLES = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
TURN_END = "\n\n"
DONE = b"data: [DONE]\n\n"


# ---- models ----------------------------------------------------------------------------------------
def model_ids(gw: Gateway) -> list[str]:
    """The models that generate text: the task of a language-model repository."""
    catalog = gw.catalog
    if catalog is None or not (catalog.generate or "generate" in VERBS.get(catalog.kind, ())):
        return []
    return [catalog.task]


def model_list(gw: Gateway) -> dict:
    """``GET /v1/models``: OpenAI's list object; ``created`` is when compress wrote the repository."""
    try:
        created = int(Path(gw.settings.repository, "task.json").stat().st_mtime) if gw.settings.repository else 0
    except OSError:
        created = 0
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "autoglm"}
                                       for name in model_ids(gw)]}


def model_card(gw: Gateway, name: str) -> dict:
    """``GET /v1/models/{id}``: one entry of :func:`model_list`; 404 in OpenAI's form for any other name."""
    for card in model_list(gw)["data"]:
        if card["id"] == name:
            return card
    raise BadParam("model", f"the model '{name}' does not exist or does not generate text: this gateway serves "
                            f"{model_ids(gw)} (GET /v1/models)", 404)


def triton_model(gw: Gateway, name: str) -> str:
    """The Triton model generating for ``name`` (as ``:generate`` resolves it); 404 with ``param: model``."""
    try:
        return gw.task_model(name, "generate")
    except BadInput:
        raise BadParam("model", f"the model '{name}' does not exist or does not generate text: this gateway "
                                f"serves {model_ids(gw)} (GET /v1/models)", 404) from None


# ---- prompts ---------------------------------------------------------------------------------------
def plain_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The documented plain template (module docstring)."""
    return "".join(f"{PLAIN_ROLES[m.role]}:\n{m.text}{TURN_END}" for m in messages) + "ASSISTANT:\n"


def template_chat_prompt(template: str, messages: Sequence[ChatMessage], metadata: dict,
                         special: dict | None = None) -> str:
    """The tokenizer's Jinja chat template, rendered as transformers does (sandboxed: it comes with a model);
    ``special``: the tokenizer's {"bos", "eos"} token texts where the metadata does not name them."""
    special = special or {}
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": m.role, "content": m.text} for m in messages], add_generation_prompt=True,
            bos_token=metadata.get("bos_token", special.get("bos", "")),
            eos_token=metadata.get("eos_token", special.get("eos", "")))
    except TemplateError as exc:
        raise BadParam("messages", f"the model's chat template refused the messages: {exc}") from None


def chat_prompt(gw: Gateway, req: ChatCompletionRequest) -> tuple[str, list[str]]:
    """(prompt, the stop strings that end the reply's turn) for ``req.messages``; a template's reply ends
    at the model's end-of-turn token instead."""
    template = gw.catalog.metadata.get("chat_template")
    if template:
        special = gw.catalog.codec.special_tokens if "tokenizer" in gw.catalog.metadata else {}
        return template_chat_prompt(template, req.messages, gw.catalog.metadata, special), []
    return plain_chat_prompt(req.messages), [TURN_END]


def generation(gw: Gateway, req: Sampling, prompt: str, param: str, max_tokens: int | None,
               default_max: int, turn_stops: Sequence[str] = (),
               special_tokens: bool = True) -> tuple[GenerateRequest, np.ndarray]:
    """The ``:generate`` request for an OpenAI one, and the prompt's token ids; BadParam naming what is wrong
    (a prompt past the model's context: 400 ``context_length_exceeded``, as OpenAI answers).
    ``special_tokens=False`` for a rendered chat template, which holds them already (as transformers'
    ``apply_chat_template`` tokenizes)."""
    req.refuse_unsupported()
    limit = gw.settings.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise BadParam(name, f"{name}={max_tokens} is above this gateway's limit of {limit}")
    if not prompt:
        raise BadParam(param, f"{param} is empty: give at least one character to continue")
    gen = GenerateRequest(prompt=prompt, max_new_tokens=max_tokens or min(default_max, limit),
                          temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=None if req.top_p in (None, 1) else req.top_p,
                          seed=None if req.seed is None else req.seed % SEED_RANGE,
                          stop=[*(req.stop or []), *turn_stops], stream=bool(req.stream))
    try:
        return gen, language_model.check_generate(gw, gen, special_tokens)
    except language_model.ContextExceeded as exc:
        raise BadParam(param, f"this model's maximum context length is {exc.context} tokens, but the {param} "
                              f"resulted in {exc.tokens} tokens: reduce the length of the {param}",
                       code="context_length_exceeded") from None
    except BadInput as exc:  # characters outside the vocabulary, a prompt above the gateway's limit
        raise BadParam(param, str(exc)) from None


# ---- answers ---------------------------------------------------------------------------------------
def _head(name: str, chat: bool, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": name}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """Token counts in the model's tokens (characters for charlm)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(name: str, chat: bool, reply: GenerateResponse, prompt_tokens: int) -> dict:
    """The whole answer: a ``text_completion`` or a ``chat.completion``."""
    choice = {"index": 0, "logprobs": None, "finish_reason": reply.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": reply.text}
    else:
        choice["text"] = reply.text
    return {**_head(name, chat, False), "choices": [choice], "usage": usage(prompt_tokens, reply.tokens)}


async def completion_chunks(gw: Gateway, name: str, model: str, gen: GenerateRequest, prompt_ids: np.ndarray,
                            chat: bool, include_usage: bool, deadline_s: float,
                            scope: dict | None = None) -> AsyncIterator[bytes]:
    """The answer as OpenAI's Server-Sent Events: a chunk per text delta (a chat's first chunk carries the
    role), one with the ``finish_reason``, the usage chunk if asked, then ``data: [DONE]``. A failure once
    streaming is reported as an ``{"error": ...}`` event, which the SDK raises as ``openai.APIError``."""
    model, decode = language_model.decoder(gw, name, model, scope)
    head = _head(name, chat, True)
    if include_usage:
        head["usage"] = None  # every chunk says it has no usage, but the last

    def chunk(choice: dict) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    def delta(text: str | None, reason: str | None) -> dict:
        body = ({} if text is None else {"content": text}) if chat else {"text": text or ""}
        return {"index": 0, **({"delta": body} if chat else body), "logprobs": None, "finish_reason": reason}

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
    tokens, reason = 0, ""
    try:
        async for piece, tokens, reason in language_model.timed_pieces(gw, model, decode, gen, prompt_ids,
                                                                       deadline_s):
            if piece:
                yield chunk(delta(piece, None))
    except Exception as exc:  # noqa: BLE001 -- the status line is sent already: report in the stream
        status = exc.status if isinstance(exc, Refused) else 504 if isinstance(exc, TimeoutError) else 500
        yield b"data: " + orjson.dumps(openai_error(status, language_model.stream_failure(exc, deadline_s))) + b"\n\n"
        yield DONE
        return
    yield chunk(delta(None, reason))
    if include_usage:
        yield b"data: " + orjson.dumps({**head, "choices": [], "usage": usage(len(prompt_ids), tokens)}) + b"\n\n"
    yield DONE
