"""Classification task endpoint (digits): ``:predict`` -- friendly JSON ↔ tensors, in numpy.

Raw 8x8 images (0..pixel_max) → the model's (B,1,8,8)/pixel_max input → logits (B,10) → softmax
→ class label and probabilities. The body is validated by :class:`PredictRequest`, the model its
OpenAPI schema comes from, with pydantic-core on the raw bytes (≈4 µs more than a bare JSON parse).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.gateway.errors import BadInput


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most likely class label")
    probabilities: list[float] = Field(description="softmax over the classes, in label order")


# rows of pixels, or the same with the model's channel axis (1x8x8); tried in that order, the first that fits
Image = Annotated[list[list[float]] | list[list[list[float]]], Field(union_mode="left_to_right")]


class PredictRequest(BaseModel):
    """``images``: raw 8x8 digits, pixel values 0..16 (as in scikit-learn's load_digits)."""

    # allow_inf_nan=False: NaN and Infinity are not JSON, refused as the JSON parser would
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra={"example": {"images": [[[0] * 8] * 8]}})
    images: list[Image] = Field(min_length=1)


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]


def read_images(body: bytes, input_spec: dict, metadata: dict) -> list:
    """The images of a ``:predict`` body, validated by :class:`PredictRequest`; BadInput naming what is wrong:
    400 for bytes that are not JSON, 422 for JSON that is not the request."""
    try:
        return PredictRequest.model_validate_json(body).images
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
    for error in errors:
        if error["type"] == "json_invalid":
            raise BadInput(f"the request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})")
        if error["type"] == "finite_number" and isinstance(error["input"], float):  # not a string such as "inf"
            raise BadInput("the request body is not valid JSON (NaN or an infinite number)")
    if any(error["loc"][:1] != ("images",) or error["type"] == "missing" for error in errors):
        raise BadInput("the request body must be {\"images\": [[8 rows of 8 pixels], ...]}", 422)
    if any(len(error["loc"]) == 1 for error in errors):  # 'images' itself: not a list, or an empty one
        raise BadInput("'images' must be a non-empty list of images (lists of pixel rows)", 422)
    if all(len(error["loc"]) > 2 and error["input"] is None for error in errors):  # null pixels: not a number
        raise _not_pixels(metadata)
    raise _numbers_only(input_spec)


def _numbers_only(input_spec: dict) -> BadInput:
    return BadInput(f"'images' must hold numbers only, each image {_plain(tuple(input_spec['shape']))} rows of "
                    f"pixels", 422)


def images_tensor(images: list, metadata: dict, input_spec: dict, max_batch: int) -> np.ndarray:
    """Check validated images against the model and scale them to its input: (N, *input shape) float32 /
    pixel_max."""
    if len(images) > max_batch:
        raise BadInput(f"{len(images)} images in one request; the model takes at most {max_batch}: split it", 413)
    shape = tuple(input_spec["shape"])
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
            x = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):  # ragged: images or rows of different lengths
        raise _numbers_only(input_spec) from None
    if x.shape[1:] != shape and x.shape[1:] != _plain(shape):
        raise BadInput(f"each image must be {'x'.join(map(str, _plain(shape)))} pixels; got shape "
                       f"{list(x.shape[1:])}", 422)
    pixel_max = float(metadata.get("pixel_max", 1.0))
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > pixel_max:
        raise _not_pixels(metadata)
    return (x / pixel_max).reshape((len(images), *shape))


def _not_pixels(metadata: dict) -> BadInput:
    return BadInput(f"pixel values must be finite and within 0..{float(metadata.get('pixel_max', 1.0)):g}", 422)


def _plain(shape: tuple) -> tuple:
    """The image shape without leading channel axes of size 1: (1, 8, 8) -> (8, 8)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predictions(logits: np.ndarray, classes: list[str]) -> list[dict]:
    probs = softmax(logits.astype(np.float32))
    best = probs.argmax(axis=1)
    return [{"class": classes[k], "probabilities": p} for k, p in zip(best.tolist(), probs)]
