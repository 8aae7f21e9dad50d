"""Request bodies drawn from the task's validation split, written to one JSON file for the locust process.

The locust process only reads this file: it never imports torch, numpy or the task code. Two lists:

* ``task``: the gateway's task endpoints. Classification (task.json metadata has ``pixel_max``):
  ``:predict`` with raw images (pixels 0..pixel_max). Language models (metadata has ``itos``, or a
  ``tokenizer`` and a ``block_size``): ``:generate`` with a validation prompt and ``:score`` with a
  validation window, as text decoded from its token ids. Text classifiers (a ``tokenizer`` and
  ``classes``): ``:predict`` with the validation texts.
* ``v2``: KServe v2 JSON infer bodies with the model's own input tensors (used through the gateway
  and straight to Triton).

Paths hold ``{model}``, filled in by the locust process with the Triton model name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from autoglm.artifacts import write_atomic
from autoglm.config import Settings
from autoglm.errors import AutoGLMError
from autoglm.text_codec import decode_table, is_language_model, is_text_classifier

V2_TYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
            "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
PREDICT, GENERATE, SCORE, INFER = ("/v1/models/{model}:predict", "/v1/models/{model}:generate",
                                   "/v1/models/{model}:score", "/v2/models/{model}/infer")


def v2_body(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """A KServe v2 JSON request for ``inputs`` (batch axis included)."""
    tensors = []
    for name, array in inputs.items():
        dtype = np.dtype(array.dtype).name
        if dtype not in V2_TYPES:
            raise AutoGLMError(f"input '{name}' has dtype {dtype}, which the v2 JSON payloads do not cover: "
                               f"use one of {sorted(V2_TYPES)}")
        data = array.reshape(-1).tolist()
        tensors.append({"name": name, "shape": list(array.shape), "datatype": V2_TYPES[dtype], "data": data})
    return {"inputs": tensors}


def task_requests(task_info: dict[str, Any], inputs: dict[str, np.ndarray], generate_tokens: int) -> list[dict]:
    """The task-endpoint request(s) for one validation example (batch of ``inputs``)."""
    meta = task_info["metadata"]
    name = task_info["io"]["inputs"][0]["name"]
    x = inputs[name]
    if is_text_classifier(meta):  # the texts back from their token ids (special and padding tokens add none)
        table = decode_table(meta)
        mask = inputs.get("attention_mask", np.ones_like(x))
        return [{"path": PREDICT, "body": {"instances": [table.decode(row[m > 0].tolist()).strip() or "."
                                                         for row, m in zip(x, mask)]}}]
    if "pixel_max" in meta:  # classification: the gateway wants raw pixels and scales them itself
        raw = np.rint(x * float(meta["pixel_max"])).astype(int)
        images = raw.reshape(len(raw), *[d for d in raw.shape[1:] if d != 1] or [1]).tolist()  # (B,1,8,8) -> (B,8,8)
        return [{"path": PREDICT, "body": {"images": images}}]
    if is_language_model(meta):  # a prompt to continue and a text to score, in the model's tokens
        table, ids = decode_table(meta), x[0].tolist()
        text, prompt = table.decode(ids), table.decode(ids[:max(1, len(ids) // 2)])
        return [{"path": GENERATE, "body": {"prompt": prompt, "max_new_tokens": generate_tokens, "temperature": 0}},
                {"path": SCORE, "body": {"text": text}}]
    raise AutoGLMError(f"task '{task_info['task']}' has no task endpoint this load test knows (its metadata has "
                       "neither pixel_max, itos nor a tokenizer): use --scenario v2 or --scenario triton")


def build_payloads(settings: Settings, task_info: dict[str, Any], samples: int = 128, per_request: int = 1,
                   generate_tokens: int = 8) -> dict[str, Any]:
    """``samples`` requests per scenario from the validation split, ``per_request`` examples each."""
    from autoglm.tasks import get_task, task_class

    if task_class(settings.task.name).name != task_info["task"]:  # a user task is configured as "module:Class"
        # the served task, not the configured one: the configured model settings belong to another task
        served = settings.task.model_copy(update={"name": task_info["task"], "model": {}})
        settings = settings.model_copy(update={"task": served})
    task = get_task(settings)
    task.prepare()
    batches = task.batches("val", per_request, samples, seed=settings.run.seed, model_args=task_info["model_args"])
    scenarios: dict[str, list[dict]] = {"task": [], "v2": []}
    if is_language_model(task_info["metadata"]):  # language models: streaming generation too
        scenarios["generate"] = []
    task_error = None
    for inputs, _targets in batches:
        scenarios["v2"].append({"path": INFER, "body": v2_body(inputs)})
        if task_error is None:
            try:
                requests = task_requests(task_info, inputs, generate_tokens)
                scenarios["task"].extend(requests)
                if "generate" in scenarios:
                    scenarios["generate"] += [{"path": r["path"], "body": {**r["body"], "stream": True}}
                                              for r in requests if r["path"] == GENERATE]
            except AutoGLMError as exc:
                task_error = str(exc)
    if not scenarios["v2"]:
        raise AutoGLMError(f"task '{task_info['task']}' yielded no validation examples: prepare its data first")
    if task_error:
        scenarios.pop("task")
    return {"task": task_info["task"], "per_request": per_request, "scenarios": scenarios,
            "unavailable": {"task": task_error} if task_error else {}}


def write_payloads(path: Path, payloads: dict[str, Any]) -> Path:
    """Write the payload file (compact JSON: the locust process parses it once)."""
    return write_atomic(path, json.dumps(payloads, separators=(",", ":")).encode())
