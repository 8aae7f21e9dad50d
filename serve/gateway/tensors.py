"""KServe v2 inference requests: validation against a model's config, and the binary tensor codec.

Triton answers a malformed request with a 500 (bad JSON, data that does not match its shape), so the
gateway checks every request against the model's own config before forwarding it, and answers a
client's mistake with a 4xx that names the input and the fix. The binary extension carries a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, Field

from serve.gateway.errors import BadInput, Refused

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BYTES": None}
DATATYPE = {np.dtype(v).name: k for k, v in DTYPES.items() if v is not None}
_DATATYPE_OF = {np.dtype(v): k for k, v in DTYPES.items() if v is not None}


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype of a numpy dtype, looked up by the dtype itself where it can be:
    ``dtype.name`` is a Python property costing ≈3-6 µs (measured), once per tensor of a request."""
    return _DATATYPE_OF.get(dtype) or DATATYPE[dtype.name]


# ---- what an infer request and its answer hold: the OpenAPI document's, checked by check_request ----
class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(examples=["FP32"])
    data: list[Any] | None = Field(None, description="row-major values; omit when binary_data_size is given")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for binary tensors')


class InferRequest(BaseModel):
    """KServe v2 inference request. With the binary extension, the body is this JSON followed by raw
    tensor bytes, and the ``Inference-Header-Content-Length`` header gives the JSON's length."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor]
    outputs: list[dict[str, Any]] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    outputs: list[InferTensor]


@dataclass(frozen=True)
class TensorSig:
    name: str
    datatype: str  # KServe name: FP32, INT64, ...
    dims: tuple[int, ...]  # without the batch axis; -1 is dynamic

    def check_shape(self, shape: list, batched: bool, max_batch: int) -> None:
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise BadInput(f"input '{self.name}': shape must be a list of non-negative integers, got {shape!r}")
        body = shape[1:] if batched else shape
        expected = ("[batch, " if batched else "[") + ", ".join("*" if d < 0 else str(d) for d in self.dims) + "]"
        if batched and (not shape or not 1 <= shape[0] <= max_batch):
            raise BadInput(f"input '{self.name}': shape {shape} needs a batch size between 1 and {max_batch} "
                           f"first; expected {expected}")
        if len(body) != len(self.dims) or any(d >= 0 and d != s for d, s in zip(self.dims, body)):
            raise BadInput(f"input '{self.name}': shape {shape} does not match the model's {expected}")


class Plan(NamedTuple):
    """What validating a request header found: rows, binary bytes expected, float tensors to check."""

    rows: int
    binary_size: int
    floats: tuple[tuple[str, int, int, str], ...]  # (name, offset, size, dtype) of each binary float input


@dataclass(frozen=True)
class ModelSignature:
    """What a model accepts, from Triton's ``GET /v2/models/<m>/config``.

    ``plans`` caches validated binary request headers: a client sends the same header bytes for the
    same shapes, so only the tensor bytes (NaN/inf) are checked again.
    """

    name: str
    max_batch_size: int
    inputs: dict[str, TensorSig]
    outputs: tuple[str, ...]
    plans: dict[bytes, Plan] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict) -> ModelSignature:
        def sig(t: dict) -> TensorSig:
            return TensorSig(t["name"], t["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES"),
                             tuple(int(d) for d in t.get("dims", ())))

        return cls(config["name"], int(config.get("max_batch_size", 0)),
                   {t["name"]: sig(t) for t in config.get("input", [])},
                   tuple(t["name"] for t in config.get("output", [])))


def _header_length(value: bytes, body_size: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise BadInput(f"Inference-Header-Content-Length must be an integer, got {value[:20]!r}") from None
    if not 0 < n <= body_size:
        raise BadInput(f"Inference-Header-Content-Length {n} is outside the {body_size}-byte body")
    return n


def split_body(body: bytes, header_length: bytes | None) -> tuple[dict, memoryview]:
    """(JSON header, binary part) of an infer request; BadInput for malformed JSON."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        n = _header_length(header_length, len(body))
        view = memoryview(body)
        json_part, binary = view[:n], view[n:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"the request body is not valid JSON ({exc}); NaN and Infinity are not JSON") from None
    if not isinstance(header, dict):
        raise BadInput("the request body must be a JSON object with an 'inputs' list")
    return header, binary


_ZEROS: dict[tuple[str, int], np.ndarray] = {}


def _all_finite(values: np.ndarray) -> bool:
    """True when no value is NaN or infinite: x·0 is NaN exactly for those (2 µs vs 4.5 for isfinite().all())."""
    key = (values.dtype.str, values.size)
    zeros = _ZEROS.get(key)
    if zeros is None:
        zeros = np.zeros(values.size, values.dtype)
        if len(_ZEROS) < 64:
            _ZEROS[key] = zeros
    return math.isfinite(values.dot(zeros))


def _check_json_data(spec: TensorSig, data, count: int) -> None:
    try:
        array = np.asarray(data)
    except ValueError:
        raise BadInput(f"input '{spec.name}': 'data' is a ragged nested list") from None
    if array.size != count:
        raise BadInput(f"input '{spec.name}': 'data' holds {array.size} values but shape needs {count}")
    kind = array.dtype.kind
    want = np.dtype(DTYPES[spec.datatype]).kind if DTYPES[spec.datatype] is not None else "U"
    ok = {"f": "iuf", "i": "iu", "u": "iu", "b": "b", "U": "U"}.get(want, want)
    if array.size and kind not in ok:
        raise BadInput(f"input '{spec.name}': 'data' holds {array.dtype.name} values, not {spec.datatype}")
    if array.size and want == "f" and kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is what is looked for
            finite = _all_finite(array.astype(DTYPES[spec.datatype], copy=False))
        if not finite:  # 1e308 is a finite JSON number but infinite in FP32/FP16: the model would answer NaN
            raise BadInput(f"input '{spec.name}': 'data' holds values outside {spec.datatype}'s finite range")


def check_request(sig: ModelSignature, header: dict, binary: memoryview) -> Plan:
    """Validate an infer request's header (and inline data) against ``sig``."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput(f"'inputs' must be a non-empty list; model '{sig.name}' takes {sorted(sig.inputs)}")
    batched = sig.max_batch_size > 0
    offset, rows, seen, floats = 0, None, set(), []
    for item in inputs:
        name = item.get("name") if isinstance(item, dict) else None
        spec = sig.inputs.get(name)
        if spec is None:
            raise BadInput(f"unknown input {name!r}: model '{sig.name}' takes {sorted(sig.inputs)}")
        if name in seen:
            raise BadInput(f"input '{name}' is given twice")
        seen.add(name)
        if item.get("datatype") != spec.datatype:
            raise BadInput(f"input '{name}': datatype {item.get('datatype')!r} should be {spec.datatype}")
        shape = item.get("shape")
        spec.check_shape(shape, batched, sig.max_batch_size)
        if batched:
            if rows is not None and shape[0] != rows:
                raise BadInput(f"input '{name}' has batch {shape[0]}, other inputs have {rows}")
            rows = shape[0]
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0:  # noqa: E721 -- not a bool, not a float like 8.0
                raise BadInput(f"input '{name}': binary_data_size must be a whole number of bytes (got {size!r})")
            dtype = DTYPES[spec.datatype]
            if dtype is not None and size != count * np.dtype(dtype).itemsize:
                raise BadInput(f"input '{name}': binary_data_size {size} should be {count} x "
                               f"{np.dtype(dtype).itemsize} bytes for shape {shape}")
            if dtype is not None and np.dtype(dtype).kind == "f":
                floats.append((name, offset, size, np.dtype(dtype).str))
            offset += size
            if offset > len(binary):
                raise BadInput(f"input '{name}': the body ends before its {size} binary bytes")
        elif "data" in item:
            _check_json_data(spec, item["data"], count)
        else:
            raise BadInput(f"input '{name}' has neither 'data' nor binary_data_size (shared memory is not "
                           f"available through the gateway)")
    missing = set(sig.inputs) - seen
    if missing:
        raise BadInput(f"missing input(s) {sorted(missing)} for model '{sig.name}'")
    if offset != len(binary):
        raise BadInput(f"the body carries {len(binary)} binary bytes but the inputs declare {offset}")
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadInput(f"'outputs' must be a list of {{\"name\": ...}}; model '{sig.name}' returns "
                       f"{list(sig.outputs)}")
    for key in ("id", "parameters"):  # Triton answers a wrong type here with a 500: say it as the client's error
        if key in header and not isinstance(header[key], str if key == "id" else dict):
            raise BadInput(f"'{key}' must be {'a string' if key == 'id' else 'an object'} (got {header[key]!r})")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") not in sig.outputs:
            raise BadInput(f"unknown output {out.get('name') if isinstance(out, dict) else out!r}: model "
                           f"'{sig.name}' returns {list(sig.outputs)}")
    return Plan(rows or 1, offset, tuple(floats))


def check_finite(plan: Plan, binary: memoryview) -> None:
    """BadInput naming the first binary float input holding NaN or infinity."""
    for name, offset, size, dtype in plan.floats:
        if not _all_finite(np.frombuffer(binary[offset:offset + size], dtype)):
            raise BadInput(f"input '{name}' contains NaN or infinity")


def validate(sig: ModelSignature, body: bytes, header_length: bytes | None) -> int:
    """Validate a whole infer request (JSON or binary) against ``sig``; returns its rows."""
    if header_length is None:
        header, binary = split_body(body, None)
        return check_request(sig, header, binary).rows
    n = _header_length(header_length, len(body))
    head = body[:n]
    plan = sig.plans.get(head)
    if plan is None:
        header, binary = split_body(body, header_length)
        plan = check_request(sig, header, binary)
        if len(sig.plans) < 256:  # bounded: a client varying its headers cannot grow it without limit
            sig.plans[head] = plan
    binary = memoryview(body)[n:]
    if len(binary) != plan.binary_size:
        raise BadInput(f"the body carries {len(binary)} binary bytes but the inputs declare {plan.binary_size}")
    check_finite(plan, binary)
    return plan.rows


def encode_request(inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> tuple[bytes, int]:
    """A binary-extension infer request: (body, header length)."""
    header = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": datatype_of(a.dtype),
                          "parameters": {"binary_data_size": a.nbytes}} for name, a in inputs.items()],
              "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}
    head = orjson.dumps(header)
    return b"".join([head, *(np.ascontiguousarray(a).tobytes() for a in inputs.values())]), len(head)


def decode_response(body: bytes, header_length: bytes | None) -> dict[str, np.ndarray]:
    """Output tensors of an infer response, binary or JSON. A reply that cannot be read (a header length or
    tensor size outside the body, a size that does not match the shape, bad JSON) is Triton's fault: 502."""
    try:
        n = int(header_length) if header_length else len(body)
        if not 0 < n <= len(body):
            raise ValueError(f"Inference-Header-Content-Length {n} is outside the {len(body)}-byte reply")
        header = orjson.loads(memoryview(body)[:n])
        out, offset = {}, n
        for item in header["outputs"]:
            name, dtype, shape = item["name"], DTYPES[item["datatype"]], [int(d) for d in item["shape"]]
            if dtype is None:
                raise ValueError(f"output '{name}' is BYTES, which the gateway does not decode")
            size = (item.get("parameters") or {}).get("binary_data_size")
            if size is None:
                out[name] = np.asarray(item["data"], dtype=dtype).reshape(shape)
                continue
            count = math.prod(shape)
            if size != count * np.dtype(dtype).itemsize or offset + size > len(body):
                raise ValueError(f"output '{name}' declares {size} bytes for shape {shape} with "
                                 f"{len(body) - offset} left in the reply")
            out[name] = np.frombuffer(body, dtype, count=count, offset=offset).reshape(shape)
            offset += size
    except (ValueError, TypeError, KeyError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise Refused(502, f"Triton's reply could not be read: {exc}") from None
    return out
