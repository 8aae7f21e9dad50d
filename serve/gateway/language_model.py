"""Language-model task endpoints (charlm, Hugging Face causal LMs): ``:generate`` and ``:score``, in numpy
(no torch or onnx here); text <-> tokens through the catalog's :class:`autoglm.text_codec.TextCodec`.

Generation runs in Triton's KV-cache model (``<task>-generate``, streamed token by token) when
compress built one and the request names the task; a variant name (or a model without decode
graphs) recomputes the context per token here, one Triton request per token. Scoring splits text
into block_size windows, batched.

Tokens are characters for charlm, the tokenizer's tokens otherwise. A prompt longer than a tokenizer
model's context (``block_size``) is refused (:class:`ContextExceeded`), as OpenAI refuses one; charlm's
keep their last block_size characters, as that model was trained to.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from autoglm.sampling import Sampler, StopMatcher
from autoglm.text_codec import EncodeError
from serve.gateway.errors import BadInput, Refused
from serve.gateway.worker import Gateway

log = logging.getLogger("serve.gateway")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1, description="text to continue (charlm: every character must be in the "
                        "vocabulary; a tokenizer model: at most its context of block_size tokens)")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate (bounded by the gateway's limit)")
    temperature: float = Field(1.0, ge=0, le=100, description="0 picks the most likely token")
    top_k: int | None = Field(None, ge=1, le=2**31 - 1, description="sample among the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="sample among the most likely tokens whose "
                                "probabilities add up to top_p (nucleus sampling)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="fixes the sampling for reproducible text")
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8, description="end the text before the first of these strings")
    stream: bool = Field(False, description="answer as Server-Sent Events: text deltas as they come, then a summary")


class GenerateResponse(BaseModel):
    model: str
    text: str = Field(description="the generated continuation (without the prompt, without a stop string)")
    tokens: int = Field(description="tokens generated (characters for charlm)")
    finish_reason: str = Field(description="'length' (max_new_tokens reached) or 'stop' (a stop string or the "
                               "model's end-of-sequence token came)")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=2, description="text to score (charlm: every character must be in the "
                      "vocabulary)")


class ScoreResponse(BaseModel):
    model: str
    loss: float = Field(description="mean cross-entropy per predicted token (nats)")
    perplexity: float
    tokens: int = Field(description="tokens predicted (charlm: len(text) - 1)")


class ContextExceeded(BadInput):
    """A prompt longer than the model's context (413; OpenAI's routes answer 400 context_length_exceeded)."""

    def __init__(self, tokens: int, context: int):
        super().__init__(f"the prompt is {tokens} tokens but the model's context is {context} tokens: "
                         f"shorten the prompt", 413)
        self.tokens, self.context = tokens, context


def encode_text(gw: Gateway, text: str, special_tokens: bool = True) -> np.ndarray:
    """``text``'s token ids with the served model's codec; 422 for characters outside charlm's vocabulary."""
    try:
        return gw.catalog.codec.encode(text, special_tokens)
    except EncodeError as exc:
        raise BadInput(str(exc), 422) from None


def check_generate(gw: Gateway, req: GenerateRequest, special_tokens: bool = True) -> np.ndarray:
    """The prompt's token ids, after the checks that must fail before any answer starts (4xx).
    ``special_tokens=False`` for a prompt that holds them already (a rendered chat template)."""
    if req.max_new_tokens > gw.settings.max_new_tokens:
        raise BadInput(f"max_new_tokens={req.max_new_tokens} is above this gateway's limit of "
                       f"{gw.settings.max_new_tokens}", 422)
    if len(req.prompt) > gw.settings.max_score_chars:
        raise BadInput(f"prompt of {len(req.prompt)} characters is above the limit of {gw.settings.max_score_chars}"
                       f" (the model keeps only its last context tokens anyway)", 413)
    ids = encode_text(gw, req.prompt, special_tokens)
    meta = gw.catalog.metadata
    if "itos" not in meta and len(ids) > int(meta["block_size"]):
        raise ContextExceeded(len(ids), int(meta["block_size"]))
    if ids.size == 0:
        raise BadInput("the prompt encodes to no tokens: give some text to continue", 422)
    return ids


Piece = tuple[str, int, str]  # (text to show, tokens so far, finish reason or "")


async def kv_decode(gw: Gateway, model: str, req: GenerateRequest, prompt_ids: np.ndarray,
                    version: int | None = None) -> AsyncIterator[Piece]:
    """Generation in Triton's KV-cache model (``version`` of it): one streamed response per token, batched with
    others there."""
    payload = {"input_ids": prompt_ids.tolist(), "max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
               "top_k": req.top_k or 0, "top_p": req.top_p or 1.0, "seed": -1 if req.seed is None else req.seed}
    if req.stop:
        payload["stop"] = req.stop
    tokens = 0
    async for event in gw.stream(model, payload, version):  # one event per Triton response: one or more tokens
        ids = event.get("token_ids", [])
        tokens += len(ids) if isinstance(ids, list) else 1  # Triton writes a one-element array as a scalar
        yield event.get("text", ""), tokens, event.get("finish_reason", "")


async def recompute_decode(gw: Gateway, model: str, req: GenerateRequest, prompt_ids: np.ndarray,
                           version: int | None = None) -> AsyncIterator[Piece]:
    """Generation without a cache (models without decode graphs): one Triton request per token over the
    last block_size tokens, so concurrent generations meet in Triton's dynamic batches."""
    meta, spec, table = gw.catalog.metadata, gw.catalog.io, gw.catalog.codec.table
    block = int(meta["block_size"])
    ids = list(prompt_ids)
    sampler, stops = Sampler(req.temperature, req.top_k, req.top_p, req.seed), StopMatcher(req.stop)
    text_of = table.stream(ids)  # complete characters only
    name, out_name = spec["inputs"][0]["name"], spec["outputs"][0]["name"]
    for n in range(1, req.max_new_tokens + 1):
        context = np.asarray([ids[-block:]], dtype=np.int64)  # (1, T<=block)
        logits = (await gw.infer(model, {name: context}, (out_name,), version))[out_name]  # (1, T, V)
        token = sampler(logits[0, -1])
        ids.append(token)
        eos, done = token in table.eos_ids, n == req.max_new_tokens or token in table.eos_ids
        text, stopped = stops.push(text_of.push(token) + (text_of.flush() if done else ""))
        if stopped or eos:
            yield text + ("" if stopped else stops.flush()), n, "stop"
            return
        yield (text + stops.flush(), n, "length") if done else (text, n, "")


def decoder(gw: Gateway, name: str, model: str, scope: dict | None = None):
    """(Triton model, decode) for ``name``: the task's KV-cache model when asked by task name and compress built
    one, else recomputation; decode runs the version the routing picks for the request's ``scope`` (its canary
    split, as on inference routes; the stable version where no scope is given)."""
    use_cache = gw.catalog.generate and (name == gw.catalog.task or model == gw.catalog.generate)
    model, decode = (gw.catalog.generate, kv_decode) if use_cache else (model, recompute_decode)
    version = gw.version_for(model, scope) if scope is not None else None
    return model, lambda gw, model, req, prompt_ids: decode(gw, model, req, prompt_ids, version)


async def generate(gw: Gateway, name: str, model: str, req: GenerateRequest,
                   prompt_ids: np.ndarray | None = None, scope: dict | None = None) -> GenerateResponse:
    """The whole continuation at once (of ``prompt_ids``, where the caller encoded the prompt already)."""
    prompt_ids = check_generate(gw, req) if prompt_ids is None else prompt_ids
    model, decode = decoder(gw, name, model, scope)
    text, tokens, reason = [], 0, ""
    async for piece, tokens, reason in decode(gw, model, req, prompt_ids):
        text.append(piece)
    if not reason:
        raise Refused(502, "the generation ended without its final response (Triton stopped early)")
    return GenerateResponse(model=model, text="".join(text), tokens=tokens, finish_reason=reason)


async def timed_pieces(gw: Gateway, model: str, decode, req: GenerateRequest, prompt_ids: np.ndarray,
                       deadline_s: float) -> AsyncIterator[Piece]:
    """``decode``'s pieces for a stream, the whole generation bounded by ``deadline_s`` (TimeoutError past
    it); Refused(502) when it ends without a finish reason. Every exit closes the stream to Triton, which
    frees the sequence there (a client that goes away cancels the caller, which ends up here)."""
    pieces, reason = decode(gw, model, req, prompt_ids), ""
    deadline = asyncio.get_running_loop().time() + deadline_s
    try:
        while True:
            # the deadline bounds the generation, never a send: a slow reader is not a timeout of ours
            async with asyncio.timeout_at(deadline):
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    break
            reason = piece[2]
            yield piece
    finally:
        await pieces.aclose()
    if not reason:
        raise Refused(502, "the generation ended without its final response (Triton stopped early)")


def stream_failure(exc: Exception, deadline_s: float) -> str:
    """What a stream whose status line is already sent reports when its generation fails."""
    if isinstance(exc, (Refused, TimeoutError)):
        return str(exc) or f"no answer within the request timeout of {deadline_s:g} s"
    log.error("generation stream failed", exc_info=exc)  # a bug: still end the stream with an error event
    return f"generation failed: {exc}"


async def generate_events(gw: Gateway, name: str, model: str, req: GenerateRequest, prompt_ids: np.ndarray,
                          deadline_s: float, scope: dict | None = None) -> AsyncIterator[bytes]:
    """Server-Sent Events: ``{"delta": new text, "tokens": generated so far}`` as text arrives (a delta holds
    the tokens of one step, or of several when the model coalesces them), then the summary ``{"model",
    "text", "tokens", "finish_reason"}`` (or an ``error`` event)."""
    model, decode = decoder(gw, name, model, scope)
    text, tokens, reason = [], 0, ""
    try:
        async for piece, tokens, reason in timed_pieces(gw, model, decode, req, prompt_ids, deadline_s):
            if piece:
                text.append(piece)
                yield b"data: " + orjson.dumps({"delta": piece, "tokens": tokens}) + b"\n\n"
    except Exception as exc:  # noqa: BLE001 -- the status line is sent already: report in the stream
        yield b"event: error\ndata: " + orjson.dumps({"error": stream_failure(exc, deadline_s)}) + b"\n\n"
        return
    yield b"data: " + orjson.dumps({"model": model, "text": "".join(text), "tokens": tokens,
                                    "finish_reason": reason}) + b"\n\n"


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed cross-entropy of logits (B,T,V) against targets (B,T)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], axis=-1).sum())


async def score(gw: Gateway, model: str, req: ScoreRequest, scope: dict | None = None) -> ScoreResponse:
    """Loss and perplexity of ``text``: every token after the first predicted from its window (in the version the
    routing picks for the request's ``scope``)."""
    if len(req.text) > gw.settings.max_score_chars:
        raise BadInput(f"text of {len(req.text)} characters is above the limit of {gw.settings.max_score_chars}",
                       413)
    meta, spec = gw.catalog.metadata, gw.catalog.io
    block = int(meta["block_size"])
    ids = encode_text(gw, req.text)
    if len(ids) < 2:
        raise BadInput(f"the text is {len(ids)} token(s): scoring needs at least 2", 422)
    x, y = ids[:-1], ids[1:]
    version = gw.version_for(model, scope) if scope is not None else None
    name, out_name = spec["inputs"][0]["name"], spec["outputs"][0]["name"]
    max_batch = max(1, (await gw.signature(model)).max_batch_size)
    full = len(x) // block
    batches = [(x[:full * block].reshape(full, block), y[:full * block].reshape(full, block))] if full else []
    batches = [(bx[i:i + max_batch], by[i:i + max_batch]) for bx, by in batches for i in range(0, len(bx), max_batch)]
    if len(x) % block:
        batches.append((x[full * block:][None], y[full * block:][None]))
    total = 0.0
    for bx, by in batches:  # (B, T) windows, each predicted from its own context only
        logits = (await gw.infer(model, {name: np.ascontiguousarray(bx)}, (out_name,), version))[out_name]
        total += cross_entropy_sum(logits, by)
    loss = total / len(y)
    return ScoreResponse(model=model, loss=loss, perplexity=math.exp(min(loss, 700)), tokens=len(y))
