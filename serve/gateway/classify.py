"""Classification tasks' friendly ``:predict`` bodies, in numpy: ``images`` (digits) and texts (a Hugging Face
sequence classifier).

Raw 8x8 images (0..pixel_max) → the model's (B,1,8,8)/pixel_max input → logits (B,10) → softmax
→ class label and probabilities. The body is validated by :class:`serve.gateway.predict.PredictRequest`.
Texts (``{"instances": ["text", ...]}`` or ``[{"text": ...}, ...]``) → the tokenizer's ``input_ids`` and
``attention_mask`` (truncated to the model's ``max_length``, padded to the longest) → logits (B, classes)
→ the class label and ``{label: probability}``.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, Field

from serve.gateway.errors import BadInput
from serve.gateway.instances import without_unit_axes


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the most likely class label")
    probabilities: list[float] = Field(description="softmax over the classes, in label order")


class TextPrediction(BaseModel):
    class_: str = Field(alias="class", description="the most likely class label")
    probabilities: dict[str, float] = Field(description="softmax over the classes: label -> probability")


# rows of pixels, or the same with the model's channel axis (1x8x8); tried in that order, the first that fits
Image = Annotated[list[list[float]] | list[list[list[float]]], Field(union_mode="left_to_right")]


def images_error(errors: list[dict], input_spec: dict, metadata: dict) -> BadInput:
    """What is wrong with the ``images`` of a ``:predict`` body, from pydantic's errors under ``images``."""
    if any(len(error["loc"]) == 1 for error in errors):  # 'images' itself: not a list, or an empty one
        return BadInput("'images' must be a non-empty list of images (lists of pixel rows)", 422)
    if all(len(error["loc"]) > 2 and error["input"] is None for error in errors):  # null pixels: not a number
        return _not_pixels(metadata)
    return _numbers_only(input_spec)


def _numbers_only(input_spec: dict) -> BadInput:
    shape = without_unit_axes(tuple(input_spec["shape"]))
    return BadInput(f"'images' must hold numbers only, each image {shape} rows of pixels", 422)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def images_tensor(images: list, metadata: dict, input_spec: dict, max_batch: int) -> np.ndarray:
    """Check validated images against the model and scale them to its input: (N, *input shape) float32 /
    pixel_max."""
    if len(images) > max_batch:
        raise BadInput(f"{len(images)} images in one request; the model takes at most {max_batch}: split it", 413)
    shape = tuple(input_spec["shape"])
    try:
        # float64 first, where no JSON number overflows: a float32 conversion would need np.errstate,
        # ≈5 µs per request (measured), to keep its overflow quiet
        pixels = np.asarray(images, dtype=np.float64)
    except (ValueError, TypeError):  # ragged: images or rows of different lengths
        raise _numbers_only(input_spec) from None
    if pixels.shape[1:] != shape and pixels.shape[1:] != without_unit_axes(shape):
        raise BadInput(f"each image must be {'x'.join(map(str, without_unit_axes(shape)))} pixels; got shape "
                       f"{list(pixels.shape[1:])}", 422)
    pixel_max = float(metadata.get("pixel_max", 1.0))
    low, high = float(pixels.min()), float(pixels.max())
    if not -_FLOAT32_MAX <= low <= high <= _FLOAT32_MAX:  # NaN, infinite, or infinite once float32
        raise _not_pixels(metadata)
    # float32 rounding keeps order, so these are the float32 image's own minimum and maximum
    if np.float32(low) < 0 or np.float32(high) > pixel_max:
        raise _not_pixels(metadata)
    x = pixels.astype(np.float32)
    return (x / pixel_max).reshape((len(images), *shape))


def _not_pixels(metadata: dict) -> BadInput:
    return BadInput(f"pixel values must be finite and within 0..{float(metadata.get('pixel_max', 1.0)):g}", 422)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predictions(logits: np.ndarray, classes: list[str]) -> list[dict]:
    probs = softmax(logits.astype(np.float32))
    best = probs.argmax(axis=1)
    return [{"class": classes[k], "probabilities": p} for k, p in zip(best.tolist(), probs)]


def texts_of(instances: list) -> list[str] | None:
    """The texts of a text classifier's ``instances`` (strings, or ``{"text": string}``); None where they are
    the model's own tensors (rows of token ids, objects of inputs); BadInput naming a bad instance."""
    first = instances[0]
    if isinstance(first, list) or (isinstance(first, dict) and set(first) != {"text"}):
        return None
    texts = []
    for i, item in enumerate(instances):
        text = item.get("text") if isinstance(item, dict) and set(item) == {"text"} else item
        if not isinstance(text, str):
            raise BadInput(f"instance {i} must be a string (the text to classify) or {{\"text\": string}}; got "
                           f"{type(text).__name__}", 422)
        if not text.strip():
            raise BadInput(f"instance {i} is an empty text: give some words to classify", 422)
        texts.append(text)
    return texts


def text_predictions(logits: np.ndarray, classes: list[str]) -> list[dict]:
    probs = softmax(logits.astype(np.float32)).tolist()
    return [{"class": classes[max(range(len(p)), key=p.__getitem__)], "probabilities": dict(zip(classes, p))}
            for p in probs]
