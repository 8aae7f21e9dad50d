"""Classification task endpoint (digits): ``:predict`` -- friendly JSON ↔ tensors, in numpy.

Raw 8x8 images (0..pixel_max) → the model's (B,1,8,8)/pixel_max input → logits (B,10) → softmax
→ class label and probabilities.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve.gateway.errors import BadInput


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most likely class label")
    probabilities: list[float] = Field(description="softmax over the classes, in label order")


class PredictRequest(BaseModel):
    """``images``: raw 8x8 digits, pixel values 0..16 (as in scikit-learn's load_digits)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"images": [[[0] * 8] * 8]}})
    images: list[list[list[float]]] = Field(min_length=1)


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]


def images_tensor(images, metadata: dict, input_spec: dict, max_batch: int) -> np.ndarray:
    """Validate raw images and scale them to the model's input: (N, *input shape) float32 / pixel_max."""
    if not isinstance(images, list) or not images:
        raise BadInput("'images' must be a non-empty list of images (lists of pixel rows)", 422)
    if len(images) > max_batch:
        raise BadInput(f"{len(images)} images in one request; the model takes at most {max_batch}: split it", 413)
    shape = tuple(input_spec["shape"])
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
            x = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadInput(f"'images' must hold numbers only, each image {_plain(shape)} rows of pixels", 422) from None
    if x.shape[1:] != shape and x.shape[1:] != _plain(shape):
        raise BadInput(f"each image must be {'x'.join(map(str, _plain(shape)))} pixels; got shape "
                       f"{list(x.shape[1:])}", 422)
    pixel_max = float(metadata.get("pixel_max", 1.0))
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > pixel_max:
        raise BadInput(f"pixel values must be finite and within 0..{pixel_max:g}", 422)
    return (x / pixel_max).reshape((len(images), *shape))


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
