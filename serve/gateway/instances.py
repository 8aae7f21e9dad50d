"""KServe v1 / TF-Serving bodies for any task: ``instances`` (row format) and ``inputs`` (columnar) ↔ tensors.

Converted with the task's io spec (``task.json``'s ``io``: input and output names, numpy dtypes, shapes
without the batch axis, -1 for a dynamic axis), so a user's own task needs nothing more than its
``io_spec``. Rows: one instance per batch row, a bare value for a one-input model or an object
``{input: value}``; answered as ``predictions``, one per instance (the bare output where the model has
one output, an object of outputs otherwise). Columns: ``{input: batch}`` (or the bare batch for a
one-input model); answered as ``outputs`` in the same shape. Every mistake is a 4xx naming the
instance, the input and the expected shape and dtype, before anything reaches Triton, which answers
wrong shapes with a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serve.gateway.errors import BadInput
from serve.gateway.tensors import DATATYPE, _all_finite

NOT_JSON = "the request body is not valid JSON (NaN or an infinite number)"


@dataclass(frozen=True)
class InputSpec:
    """One model input as :mod:`serve.gateway.instances` converts it: shape without the batch axis."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1: dynamic

    @property
    def datatype(self) -> str:
        return DATATYPE[self.dtype.name]

    def describe(self) -> str:
        """``[1, 8, 8] (or [8, 8]) of FP32 (input 'image')``; ``*`` marks a dynamic axis."""
        plain = without_unit_axes(self.shape)
        also = f" (or {_dims(plain)})" if plain != self.shape else ""
        return f"{_dims(self.shape)}{also} of {self.datatype} (input '{self.name}')"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """``shape`` is the spec's, or the spec's without its leading axes of size 1 (an image without
        its channel axis); a dynamic axis takes any positive size."""
        return any(len(shape) == len(want) and all(w < 0 < s or w == s for w, s in zip(want, shape))
                   for want in (self.shape, without_unit_axes(self.shape)))


def input_specs(io: dict) -> tuple[InputSpec, ...]:
    """The io spec's inputs; BadInput where one has a dtype this endpoint cannot encode (strings)."""
    specs = []
    for item in io["inputs"]:
        dtype = np.dtype(item["dtype"])
        if dtype.name not in DATATYPE:
            raise BadInput(f"input '{item['name']}' is {item['dtype']}, which :predict does not encode: use "
                           f"/v2/models/<model>/infer", 422)
        specs.append(InputSpec(item["name"], dtype, tuple(int(d) for d in item["shape"])))
    return tuple(specs)


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if d < 0 else str(d) for d in shape) + "]"


def without_unit_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without leading axes of size 1: (1, 8, 8) -> (8, 8)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _takes(specs: tuple[InputSpec, ...]) -> str:
    return "; ".join(spec.describe() for spec in specs)


def _has_bool(value) -> bool:
    """A JSON true/false anywhere in a nested list (numpy would read it as 1 or 0)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_has_bool(v) for v in value)


def _column(spec: InputSpec, values: list, where: Callable[[int], str], bools: bool) -> np.ndarray:
    """One input's values, one per batch row, as an (N, *spec.shape) array of its dtype."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged somewhere: find the row
        array = None
    if array is None or array.dtype == object or not spec.fits(array.shape[1:]):
        _diagnose_rows(spec, values, where)
    kind, want = array.dtype.kind, spec.dtype.kind
    if want == "b":
        if kind != "b":
            raise BadInput(f"{where(0)}: expected true/false values for {spec.describe()}, got "
                           f"{_kind_name(kind)}", 422)
    elif kind not in ("iuf" if want in "f" else "iu") or (bools and _has_bool(values)):
        got = "true/false" if kind == "b" or bools and _has_bool(values) else _kind_name(kind)
        raise BadInput(f"expected {'integers' if want in 'iu' else 'numbers'} for {spec.describe()}, got {got}", 422)
    if kind == "f" and not _all_finite(array.ravel()):  # NaN, Infinity or 1e999 in the body: not JSON
        raise BadInput(NOT_JSON)
    if want in "iu" and array.size:
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadInput(f"values of input '{spec.name}' must lie within {spec.datatype}'s range "
                           f"{info.min}..{info.max}", 422)
    with np.errstate(over="ignore"):  # beyond FP16/FP32 becomes inf, refused just below
        out = array.astype(spec.dtype, copy=False)
    if want == "f" and not _all_finite(out.ravel()):
        raise BadInput(f"values of input '{spec.name}' lie outside {spec.datatype}'s finite range", 422)
    return out.reshape((len(values), *spec.shape))


def _kind_name(kind: str) -> str:
    return {"U": "strings", "f": "floating-point numbers", "b": "true/false", "O": "mixed values"}.get(kind, kind)


def _diagnose_rows(spec: InputSpec, values: list, where: Callable[[int], str]) -> None:
    """BadInput naming the first row whose shape is wrong, or two rows that differ on a dynamic axis."""
    first = None
    for i, value in enumerate(values):
        try:
            shape = np.shape(value)
        except ValueError:
            raise BadInput(f"{where(i)}: expected shape {spec.describe()}, got a ragged nested list", 422) from None
        if np.asarray(value).dtype == object or not spec.fits(shape):
            got = f"shape {list(shape)}" if np.asarray(value).dtype != object else "values that are not numbers"
            raise BadInput(f"{where(i)}: expected shape {spec.describe()}, got {got}", 422)
        if first is None:
            first = shape
        elif shape != first:
            raise BadInput(f"{where(0)} has shape {list(first)} but {where(i)} {list(shape)}: one request is one "
                           f"batch, so every row needs the same shape; send rows of other lengths separately", 422)
    raise BadInput(f"expected shape {spec.describe()} in every row", 422)  # pragma: no cover - a row fails above


def rows_to_tensors(instances: list, specs: tuple[InputSpec, ...], max_batch: int,
                    bools: bool) -> dict[str, np.ndarray]:
    """``instances`` (one per batch row) -> named (N, *shape) arrays; ``bools``: the body holds true/false."""
    _check_batch(len(instances), max_batch)
    if len(specs) == 1 and not isinstance(instances[0], dict):
        spec = specs[0]
        return {spec.name: _column(spec, instances, lambda i: f"instance {i}", bools)}
    names = [spec.name for spec in specs]
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise BadInput(f"instance {i}: the model takes several inputs, so each instance is an object "
                           f"{{{', '.join(repr(n) for n in names)}: ...}}; it takes {_takes(specs)}", 422)
        if set(instance) != set(names):
            raise BadInput(f"instance {i}: has inputs {sorted(instance)}, the model takes {names}: "
                           f"{_takes(specs)}", 422)
    return {spec.name: _column(spec, [instance[spec.name] for instance in instances],
                               lambda i, n=spec.name: f"instance {i} (input '{n}')", bools) for spec in specs}


def columns_to_tensors(inputs: dict | list, specs: tuple[InputSpec, ...], max_batch: int,
                       bools: bool) -> dict[str, np.ndarray]:
    """TF-Serving's columnar ``inputs``: ``{input: batch}``, or the bare batch of a one-input model."""
    names = [spec.name for spec in specs]
    if isinstance(inputs, list):
        if len(specs) != 1:
            raise BadInput(f"the model takes several inputs: send \"inputs\" as an object {{input: batch}}; it "
                           f"takes {_takes(specs)}", 422)
        inputs = {names[0]: inputs}
    if set(inputs) != set(names):
        raise BadInput(f"\"inputs\" names {sorted(inputs)}, the model takes {names}: {_takes(specs)}", 422)
    rows = {name: len(batch) if isinstance(batch, list) else None for name, batch in inputs.items()}
    for name, n in rows.items():
        if not n:
            raise BadInput(f"input '{name}': expected a non-empty list with one row per instance", 422)
    if len(set(rows.values())) > 1:
        raise BadInput(f"every input needs the same number of rows; got {rows}", 422)
    _check_batch(next(iter(rows.values())), max_batch)
    return {spec.name: _column(spec, inputs[spec.name], lambda i, n=spec.name: f"input '{n}' row {i}", bools)
            for spec in specs}


def _check_batch(rows: int, max_batch: int) -> None:
    if rows > max_batch:
        raise BadInput(f"{rows} instances in one request; the model takes at most {max_batch}: split it", 413)


def rows_of(outputs: dict[str, np.ndarray], names: tuple[str, ...]) -> list:
    """``predictions``: per instance the bare output of a one-output model, an object of outputs otherwise."""
    if len(names) == 1:
        return list(outputs[names[0]])
    return [dict(zip(names, row)) for row in zip(*(outputs[name] for name in names))]


def columns_of(outputs: dict[str, np.ndarray], names: tuple[str, ...]):
    """TF-Serving's columnar ``outputs``: the bare batch of a one-output model, ``{output: batch}`` otherwise."""
    return outputs[names[0]] if len(names) == 1 else {name: outputs[name] for name in names}
