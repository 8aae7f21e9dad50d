"""``/v1/models/{model}:predict`` for any task: the KServe v1 / TF-Serving convention, and friendly bodies.

One body model, :class:`PredictRequest`, validates the raw bytes (pydantic-core, as fast as a bare JSON
parse plus ≈4 µs) and is the route's OpenAPI schema; the handler picks the form by the body's key:

- ``{"instances": [...]}`` → ``{"model", "predictions": [...]}``, rows of the model's own input tensors,
  converted with the task's io spec (:mod:`serve.gateway.instances`): any task, a user's own included;
- ``{"inputs": {...}}`` (or a bare list for a one-input model) → ``{"model", "outputs": ...}``, TF-Serving's
  columnar form;
- ``{"images": [...]}`` → class and probabilities per image, for classification tasks
  (:mod:`serve.gateway.classify`);
- for a text classifier, ``{"instances": ["text", ...]}`` (or ``[{"text": ...}]``) → class and
  ``{label: probability}`` per text.

Language models take rows of token ids (``instances: [[ids...], ...]``, one length per request) and
answer their logits; text goes to ``:generate`` and ``:score``.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.gateway.classify import (Image, Prediction, TextPrediction, images_error, images_tensor, predictions,
                                    text_predictions, texts_of)
from serve.gateway.errors import BadInput
from serve.gateway.instances import NOT_JSON, columns_of, columns_to_tensors, input_specs, rows_of, rows_to_tensors
from serve.gateway.worker import JSON, Gateway

FORMS = ("images", "instances", "inputs")
Instance = Annotated[Any, Field(description="one batch row of the model's input: a nested list of numbers for a "
                                            "one-input model, or an object {input name: value}")]


class PredictRequest(BaseModel):
    """Exactly one of ``instances`` (rows), ``inputs`` (columns), or ``images`` (classification tasks).

    Rows and columns hold the model's input tensors as the task's io spec gives them (``GET
    /v2/models/<model>`` shows names, datatypes and shapes); ``images`` are raw 8x8 digits, pixel
    values 0..16 (as in scikit-learn's load_digits).
    """

    # allow_inf_nan=False: NaN and Infinity are not JSON, refused as the JSON parser would
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={
        "oneOf": [{"required": [form]} for form in FORMS],
        "examples": [{"instances": [[0.5, -1.0, 2.0, 0.0]]}, {"inputs": {"x": [[0.5, -1.0, 2.0, 0.0]]}},
                     {"images": [[[0] * 8] * 8]}]})
    instances: list[Instance] = Field(None, min_length=1, description="one entry per batch row")
    inputs: (Annotated[dict[str, list[Any]], Field(min_length=1)] | Annotated[list[Any], Field(min_length=1)]) = Field(
        None, description="{input name: rows}, or the rows alone for a one-input model")
    images: list[Image] = Field(None, min_length=1, description="classification tasks: raw images")

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        if sum(getattr(self, form) is not None for form in FORMS) != 1:
            raise ValueError("give exactly one of 'instances', 'inputs' or 'images'")
        return self


class PredictResponse(BaseModel):
    """``predictions`` answer ``instances`` (one per instance: the bare output of a one-output model, an
    object of outputs otherwise) and ``images`` (class and probabilities); ``outputs`` answer ``inputs``."""

    model: str
    predictions: list[Prediction] | list[TextPrediction] | list[Any] | None = None
    outputs: list[Any] | dict[str, list[Any]] | None = None


def _forms(gw: Gateway) -> str:
    """The bodies the task's models take, for error messages."""
    specs = "; ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in gw.catalog.io["inputs"])
    forms = f'{{"instances": [row, ...]}} or {{"inputs": {{name: rows}}}} with rows of {specs} (without batch axis)'
    if gw.catalog.kind == "classify":
        forms += ', or {"images": [[8 rows of 8 pixels], ...]}'
    if gw.catalog.kind == "text-classify":
        forms += ', or {"instances": ["text", ...]}'
    return f"the request body must be {forms}"


def read_request(gw: Gateway, body: bytes) -> PredictRequest:
    """The validated body; BadInput naming what is wrong: 400 for bytes that are not JSON, 422 otherwise."""
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
    for error in errors:
        if error["type"] == "json_invalid":
            raise BadInput(f"the request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
        if error["type"] == "finite_number" and isinstance(error["input"], float):  # not a string such as "inf"
            raise BadInput(NOT_JSON)
    form = {error["loc"][0] for error in errors if error["loc"] and error["type"] != "extra_forbidden"}
    if len(form) != 1 or any(error["type"] in ("missing", "extra_forbidden") or not error["loc"] for error in errors):
        raise BadInput(_forms(gw), 422)
    if form == {"images"} and gw.catalog.kind == "classify":
        raise images_error([e for e in errors if e["loc"][0] == "images"], gw.catalog.io["inputs"][0],
                           gw.catalog.metadata)
    if form == {"images"}:
        raise BadInput(f"'images' is the body of classification tasks; {_forms(gw)}", 422)
    what = "a non-empty list, one entry per instance" if form == {"instances"} else \
        "a non-empty object {input name: rows} or, for a one-input model, a non-empty list of rows"
    raise BadInput(f"'{form.pop()}' must be {what}", 422)


async def predict(gw: Gateway, route, scope, headers: dict, body: bytes):
    """``:predict`` in any of its forms (see the module's docstring)."""
    name = scope["path"][len(route.prefix):-len(route.suffix)]
    model = gw.task_model(name, "predict")
    request = read_request(gw, body)
    version = gw.version_for(model, scope, headers)  # a canary split, where the routing has one
    if request.images is not None:
        return await _classify(gw, route, model, request.images, version)
    if request.instances is not None and gw.catalog.kind == "text-classify":
        texts = texts_of(request.instances)
        if texts is not None:
            return await _classify_texts(gw, route, model, texts, version)
    specs = input_specs(gw.catalog.io)
    sig = await gw.signature(model)
    bools = b"true" in body or b"false" in body  # only then can a true/false hide among numbers
    if request.instances is not None:
        tensors = rows_to_tensors(request.instances, specs, sig.max_batch_size or 1, bools)
    else:
        tensors = columns_to_tensors(request.inputs, specs, sig.max_batch_size or 1, bools)
    if gw.catalog.kind == "language-model":
        _check_token_ids(gw.catalog.metadata, specs[0].name, tensors[specs[0].name])
    gw.metrics.observe_rows(route.path, len(next(iter(tensors.values()))))
    names = tuple(item["name"] for item in gw.catalog.io["outputs"])
    outputs = await gw.infer(model, tensors, names, version)
    payload = {"model": model, "predictions": rows_of(outputs, names)} if request.instances is not None else {
        "model": model, "outputs": columns_of(outputs, names)}
    return 200, (JSON,), orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


async def _classify(gw: Gateway, route, model: str, images: list, version: int | None):
    """``{"images": [...]}`` -> ``{"model", "predictions": [{"class", "probabilities"}]}``."""
    if gw.catalog.kind != "classify":
        raise BadInput(f"'images' is the body of classification tasks; {_forms(gw)}", 422)
    spec = gw.catalog.io["inputs"][0]
    sig = await gw.signature(model)
    x = images_tensor(images, gw.catalog.metadata, spec, sig.max_batch_size or 1)
    gw.metrics.observe_rows(route.path, len(x))
    out_name = gw.catalog.io["outputs"][0]["name"]
    logits = (await gw.infer(model, {spec["name"]: x}, (out_name,), version))[out_name]
    payload = {"model": model, "predictions": predictions(logits, gw.catalog.metadata["classes"])}
    return 200, (JSON,), orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


async def _classify_texts(gw: Gateway, route, model: str, texts: list[str], version: int | None):
    """Texts -> ``{"model", "predictions": [{"class", "probabilities": {label: p}}]}``."""
    max_batch = (await gw.signature(model)).max_batch_size or 1
    if len(texts) > max_batch:
        raise BadInput(f"{len(texts)} texts in one request; the model takes at most {max_batch}: split it", 413)
    meta, io = gw.catalog.metadata, gw.catalog.io
    ids, mask = gw.catalog.codec.encode_batch(texts, int(meta["max_length"]))  # (B, T) each
    given = {"input_ids": ids, "attention_mask": mask}
    tensors = {s["name"]: given.get(s["name"], np.zeros_like(ids)) for s in io["inputs"]}  # token_type_ids: 0
    gw.metrics.observe_rows(route.path, len(texts))
    out_name = io["outputs"][0]["name"]
    logits = (await gw.infer(model, tensors, (out_name,), version))[out_name]
    payload = {"model": model, "predictions": text_predictions(logits, meta["classes"])}
    return 200, (JSON,), orjson.dumps(payload)


def _check_token_ids(metadata: dict, name: str, ids) -> None:
    """Token ids within the vocabulary and rows within the context the model was trained for: beyond
    either, the model itself fails (an embedding lookup out of range), which is the client's mistake."""
    vocab = len(metadata["itos"]) if "itos" in metadata else metadata.get("vocab_size")
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise BadInput(f"input '{name}': token ids must lie within 0..{vocab - 1} (the model's vocabulary)", 422)
    block = metadata.get("block_size")
    if block is not None and ids.ndim > 1 and ids.shape[1] > int(block):
        raise BadInput(f"input '{name}': rows of {ids.shape[1]} tokens; the model takes at most {block}", 422)
