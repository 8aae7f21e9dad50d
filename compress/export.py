"""torch -> ONNX export with a numerical parity gate.

The dynamo exporter is the default (it is where torch.onnx is going); the TorchScript-based exporter
is the fallback when dynamo cannot trace a model, and is several times faster to run, which matters
when every tuning trial exports. Either way the batch axis (and charlm's sequence axis) stays dynamic,
and the gate compares ONNX Runtime with torch on real validation batches of two sizes, so a wrong
dynamic axis or a broken op is caught before anything is published.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autoglm.artifacts import atomic_output, write_atomic
from autoglm.errors import AutoGLMError
from autoglm.tasks import Task

Exporter = Literal["dynamo", "legacy"]
OPSET = 18


class ParityError(AutoGLMError):
    """The exported model does not compute what the torch model computes."""


@dataclass
class ParityReport:
    variant: str
    exporter: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    batch_sizes: tuple[int, ...]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dynamic_axes(task: Task, model_args: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """Axis 0 of every tensor is the batch; -1 entries of a spec are further dynamic axes."""
    spec = task.io_spec(model_args)
    axes = {}
    for tensor in (*spec.inputs, *spec.outputs):
        axes[tensor.name] = {0: "batch"} | {i + 1: f"{tensor.name}_dim{i + 1}"
                                             for i, d in enumerate(tensor.shape) if d == -1}
    return axes


def export_onnx(model, task: Task, model_args: Mapping[str, Any], path: Path | str,
                exporter: Exporter = "dynamo") -> Exporter:
    """Export ``model`` to ``path`` (atomically); returns the exporter that succeeded.

    A dynamo failure falls back to the legacy exporter (logged); a legacy failure is an error.
    """
    import torch

    spec = task.io_spec(model_args)
    example = task.example_inputs(batch_size=2, model_args=model_args)
    device = next(model.parameters()).device  # export runs where the model is (run.device)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[t.name])).to(device) for t in spec.inputs)
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    axes = _dynamic_axes(task, model_args)
    model.eval()
    order = ["dynamo", "legacy"] if exporter == "dynamo" else ["legacy"]
    errors = []
    for name in order:
        try:
            with atomic_output(path) as tmp, _quiet():
                if name == "dynamo":
                    shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes[n]} for n in names_in)
                    program = torch.onnx.export(model, args, dynamo=True, input_names=names_in,
                                                output_names=names_out, dynamic_shapes=shapes,
                                                opset_version=OPSET, external_data=False)
                    program.save(str(tmp))
                else:
                    torch.onnx.export(model, args, str(tmp), dynamo=False, input_names=names_in,
                                      output_names=names_out, dynamic_axes=axes, opset_version=OPSET)
            _rename_dims(Path(path), axes)
            return name
        except AutoGLMError:
            raise
        except Exception as exc:  # the exporters raise many types; keep the reason for the fallback log
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            logging.getLogger(__name__).warning("ONNX export with %s failed, %s", name,
                                                "trying the legacy exporter" if name == "dynamo" else "giving up")
    raise AutoGLMError("ONNX export failed: " + " | ".join(errors))


def _rename_dims(path: Path, axes: dict[str, dict[int, str]]) -> None:
    """Give dynamic axes the same names whichever exporter ran (dynamo names them s0, s1, ...)."""
    import onnx

    graph_model = onnx.load(str(path))
    for value in (*graph_model.graph.input, *graph_model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, label in axes.get(value.name, {}).items():
            if axis < len(dims):
                dims[axis].ClearField("dim_value")
                dims[axis].dim_param = label
    write_atomic(path, graph_model.SerializeToString())


def simplify_onnx(path: Path | str) -> tuple[int, int]:
    """Fold constants and fuse with onnxslim; the result is kept only if it has fewer nodes.

    Returns (nodes before, nodes after). The parity gate runs on whatever is kept.
    """
    import onnx

    from autoglm._lazy import require

    onnxslim = require("onnxslim", None, "ONNX graph simplification")
    model = onnx.load(str(path))
    before = len(model.graph.node)
    try:
        with _quiet():
            slim = onnxslim.slim(model)
    except Exception as exc:  # a simplifier bug must not cost the export; the unsimplified graph is fine
        logging.getLogger(__name__).warning("onnxslim failed on %s (%s); keeping the exported graph", path, exc)
        return before, before
    after = len(slim.graph.node)
    if after < before:
        write_atomic(path, slim.SerializeToString())
        return before, after
    return before, before


def check_parity(task: Task, model, onnx_path: Path | str, model_args: Mapping[str, Any], *,
                 variant: str = "fp32", exporter: str = "", atol: float = 1e-4, rtol: float = 1e-3,
                 batch_sizes: tuple[int, ...] = (1, 7), n_batches: int = 2) -> ParityReport:
    """Compare ONNX Runtime with torch elementwise on real validation batches.

    Two batch sizes (one odd) exercise the dynamic batch axis. Passing means
    ``|onnx - torch| <= atol + rtol * |torch|`` everywhere.
    """
    from autoglm.tasks.predict import onnx_predictor, torch_predictor

    reference, candidate = torch_predictor(model), onnx_predictor(onnx_path)
    max_abs = max_rel = 0.0
    passed = True
    for batch_size in batch_sizes:
        for inputs, _ in task.batches("val", batch_size, n_batches, seed=0, model_args=model_args):
            want, got = reference(inputs), candidate(inputs)
            if want.shape != got.shape:
                raise ParityError(f"{onnx_path}: output shape {got.shape} != torch's {want.shape} at batch "
                                  f"{batch_size}; the export lost a dynamic axis")
            diff = np.abs(got.astype(np.float64) - want)
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / (np.abs(want) + 1e-12)).max()))
            passed &= bool(np.all(diff <= atol + rtol * np.abs(want)))
    return ParityReport(variant, exporter, max_abs, max_rel, atol, rtol, tuple(batch_sizes), passed)


def require_parity(reports: list[ParityReport], path: Path | str) -> None:
    """Write ``parity.json``; raise ParityError (after writing it) if any report failed."""
    write_atomic(path, (json.dumps([r.to_dict() for r in reports], indent=2) + "\n").encode())
    failed = [r for r in reports if not r.passed]
    if failed:
        worst = failed[0]
        raise ParityError(f"parity gate failed for {', '.join(r.variant for r in failed)}: max |onnx - torch| = "
                          f"{worst.max_abs:.3g} > atol {worst.atol:g} + rtol {worst.rtol:g}·|torch| "
                          f"(see {path}); nothing was published")


@contextlib.contextmanager
def _quiet():
    """The exporters print pages of progress and warnings; keep them out of the pipeline's output."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)
