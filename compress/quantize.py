"""Post-training INT8 quantization with ONNX Runtime: named recipes, a default per graph, one entry point.

A :class:`QuantRecipe` says how to quantize; :data:`PRESETS` holds the recipes that measured well on this
project's models, each with the reason; :func:`choose_preset` picks one from the ops of a graph, so a
user's own task gets a sensible default; :func:`quantize` writes the INT8 model (static QDQ needs the
task's calibration batches). A trial's knob values (see :mod:`compress.passes.int8`) become a recipe
through :func:`recipe_for`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from autoglm._lazy import require
from autoglm.artifacts import atomic_output
from autoglm.config import Calibration
from autoglm.errors import ConfigError

__all__ = ["FP32_COMPUTE_OPS", "PRESETS", "QuantRecipe", "choose_preset", "cpu_has_vnni", "optimized_ops",
           "quantize", "recipe_for"]

Mode = Literal["static", "dynamic"]
QType = Literal["int8", "uint8"]
MODES = ("static", "dynamic")
CALIBRATIONS = get_args(Calibration)
QTYPES = ("int8", "uint8")
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
FP32_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}  # what INT8 should replace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize one graph; impossible combinations are refused here, not inside ORT.

    ``op_types`` None means every op type ORT knows for the mode. ``activation_type`` None means the
    mode's natural type: uint8 for dynamic (DynamicQuantizeLinear only produces uint8) and for static
    (ORT's advice for x86: U8 activations, S8 weights). ``reduce_range`` (7-bit weights) None means
    "on unless this CPU has VNNI": x86 without VNNI sums u8 x s8 products in saturating int16 (measured
    on an AVX2 host: digits logits off by up to 2.9 vs the QDQ reference; 0.0 with reduce_range).
    """

    name: str
    mode: Mode
    calibration: Calibration | None = None
    per_channel: bool = False
    op_types: tuple[str, ...] | None = None
    activation_type: QType | None = None
    weight_type: QType = "int8"
    reduce_range: bool | None = None
    why: str = ""
    symmetric: bool = False  # zero points of 0 (int8 activations too): what TensorRT's explicit INT8 requires

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantization mode {self.mode!r} is unknown: use one of {list(MODES)}")
        if self.mode == "dynamic" and self.calibration is not None:
            raise ConfigError(f"recipe {self.name!r}: calibration={self.calibration!r} only applies to static "
                              "INT8 (dynamic computes ranges at run time): remove it or set mode='static'")
        if self.mode == "static" and self.calibration is None:
            object.__setattr__(self, "calibration", "minmax")
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration {self.calibration!r} is unknown: use one of {list(CALIBRATIONS)}")
        if self.activation_type is None:
            object.__setattr__(self, "activation_type", "uint8")
        for field, value in (("activation_type", self.activation_type), ("weight_type", self.weight_type)):
            if value not in QTYPES:
                raise ConfigError(f"recipe {self.name!r}: {field}={value!r} is unknown: use one of {list(QTYPES)}")
        if self.mode == "dynamic" and self.activation_type != "uint8":
            raise ConfigError(f"recipe {self.name!r}: dynamic INT8 quantizes activations to uint8 only: "
                              "set activation_type='uint8' (or None) or use mode='static'")
        if self.op_types is not None:
            if isinstance(self.op_types, str) or not self.op_types:
                raise ConfigError(f"recipe {self.name!r}: op_types must be a non-empty tuple such as "
                                  "('MatMul',), or None for every supported op")
            object.__setattr__(self, "op_types", tuple(self.op_types))


PRESETS: dict[str, QuantRecipe] = {
    recipe.name: recipe for recipe in (
        QuantRecipe(
            "cnn-int8-static", "static", calibration="minmax", per_channel=True,
            # ORT's static QDQ ops (Conv, Gemm, MaxPool, ...) become QLinearConv & co. with INT8 kernels.
            why="dynamic INT8 turns Conv into ConvInteger, 5-10x slower than FP32 (digits CNN: 6.6x at "
                "batch 32); static QDQ runs QLinearConv/QGemm (1.5x faster) and keeps accuracy"),
        QuantRecipe(
            "transformer-int8-dynamic", "dynamic", op_types=("MatMul",),
            # no Attention: quantize_dynamic would make it a slower QAttention
            why="keeps a small GPT's loss (1.86 -> 1.86; 2.1442 -> 2.1445) and needs no calibration; "
                "faster than FP32 at batch 32: 1.25x with VNNI, 1.05x on an AVX2-only CPU"),
        QuantRecipe(
            "transformer-int8-static-matmul", "static", calibration="minmax", op_types=("MatMul", "Gemm"),
            why="static QDQ of all ops breaks a small GPT (val loss 1.86 -> 3.24, 2.14 -> 2.84: "
                "LayerNorm/Softmax/Gather ranges); MatMul/Gemm only keeps it (1.863, 2.146); on CPU the "
                "dynamic recipe was faster, this one is for runtimes that want static ranges"),
    )
}


# The trt-int8 engines' source graph, not a choice for ONNX Runtime (hence not in PRESETS). TensorRT's explicit
# quantization takes QDQ pairs of int8 with zero point 0 only: ORT's default static graph (uint8 activations,
# asymmetric) does not parse. Compute layers only, as for LMs above.
TENSORRT_INT8 = QuantRecipe("tensorrt-int8-static", "static", calibration="minmax", per_channel=True,
                            op_types=("Conv", "MatMul", "Gemm"), activation_type="int8", reduce_range=False,
                            symmetric=True, why="symmetric int8 QDQ around Conv/MatMul/Gemm, as TensorRT parses it")


def _op_types(onnx_path: Path | str) -> set[str]:
    onnx = require("onnx", purpose="INT8 quantization")
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def choose_preset(onnx_path: Path | str) -> str:
    """The preset name suited to the graph at ``onnx_path``, judged by its ops.

    Convolutions -> ``cnn-int8-static``; MatMul/Gemm graphs (transformers, MLPs) ->
    ``transformer-int8-dynamic``: no calibration, nothing quantized that hurts LMs. (ORT's
    pre-processing rewrites Gemm as MatMul + Add, so dynamic INT8 reaches exported Linear layers too.)
    """
    ops = _op_types(onnx_path)
    if ops & {"Conv", "ConvTranspose"}:
        return "cnn-int8-static"
    if ops & ({"MatMul", "Gemm"} | ATTENTION_OPS):
        return "transformer-int8-dynamic"
    raise ConfigError(f"{onnx_path} has no Conv, MatMul or Gemm ops: INT8 would change nothing; "
                      "drop the int8 variant for this model")


def cpu_has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction ORT uses (AVX512-VNNI, AVX-VNNI, AMX).

    Non-x86 CPUs count as yes (ARM's int8 kernels do not saturate), and so does an unreadable cpuinfo.
    """
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in {"x86_64", "amd64"} or not cpuinfo.is_file():
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpuinfo.read_text().split()))


def recipe_for(onnx_path: Path | str, mode: str, calibration: str = "minmax",
               per_channel: bool | None = None) -> QuantRecipe | None:
    """A recipe from knob values: the graph's preset, switched to ``mode``; None for mode 'none'.

    Switching a CNN to dynamic quantizes only its Linear layers (never Conv: ConvInteger is slow);
    switching a transformer to static keeps to MatMul/Gemm (static QDQ of every op breaks small LMs).
    """
    if mode == "none":
        return None
    base = PRESETS[choose_preset(onnx_path)]
    if mode == base.mode:
        recipe = base
    elif mode == "dynamic":
        recipe = PRESETS["transformer-int8-dynamic"]
    elif mode == "static":
        recipe = PRESETS["transformer-int8-static-matmul"]
    else:
        raise ConfigError(f"compress.quantize.mode={mode!r} is unknown: use 'none', 'dynamic' or 'static'")
    changes = {"name": f"{recipe.name}+knobs"}
    if recipe.mode == "static":
        changes["calibration"] = calibration
    if per_channel is not None:
        changes["per_channel"] = per_channel
    return replace(recipe, **changes)


class _Calibration:
    """ORT's CalibrationDataReader over in-memory batches, fed by the graph's input names and dtypes."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], inputs: Mapping[str, np.dtype]):
        self._batches, self._inputs = batches, inputs
        self._iter = self._generate()

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._batches:
            missing = sorted(set(self._inputs) - set(batch))
            if missing:
                raise ConfigError(f"calibration batch lacks inputs {missing}: the ONNX model needs "
                                  f"{sorted(self._inputs)}; pass task.calibration_inputs(...)")
            yield {name: np.ascontiguousarray(batch[name], dtype=dtype) for name, dtype in self._inputs.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._generate()


def _input_dtypes(onnx_path: Path) -> dict[str, np.dtype]:
    onnx = require("onnx", purpose="INT8 quantization")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in graph.input if i.name not in initializers}


def _pre_process(src: Path, workdir: Path) -> Path:
    """ORT's quant_pre_process (shape inference + basic optimization); the original graph if it fails.

    Symbolic shape inference gives the quantizer the shapes it needs to pick per-channel axes and skip
    ops it cannot quantize; it fails on some exporter outputs, and quantizing without it still works.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / "pre.onnx"
    for skip_symbolic in (False, True):
        try:
            with contextlib.redirect_stdout(io.StringIO()), _no_shape_dump():
                quant_pre_process(str(src), str(out), skip_symbolic_shape=skip_symbolic)
            return out
        except Exception as exc:  # noqa: BLE001 - ORT raises many kinds here; the raw graph is the fallback
            log.info("quant_pre_process(skip_symbolic_shape=%s) failed on %s: %s", skip_symbolic, src, exc)
    return src


# ORT's symbolic shape inference saves the half-inferred model into the *current directory* when it gives up
# (onnxruntime/tools/symbolic_shape_infer.py), its weights in a uuid-named .data file beside it: a model's worth
# of litter in the user's cwd, removed here
_SHAPE_DUMP = Path("sym_shape_infer_temp.onnx")


@contextlib.contextmanager
def _no_shape_dump():
    if _SHAPE_DUMP.exists():  # never remove a user's own file
        yield
        return
    try:
        yield
    finally:
        if _SHAPE_DUMP.exists():
            import onnx

            for location in _external_data_files(onnx.load(str(_SHAPE_DUMP), load_external_data=False)):
                Path(location).unlink(missing_ok=True)
            _SHAPE_DUMP.unlink()


def _external_data_files(model) -> set[str]:
    """The files an ONNX model's initializers point to (locations relative to the model's directory)."""
    return {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def quantize(src: Path | str, dst: Path | str, recipe: QuantRecipe | str,
             calibration_inputs: Sequence[Mapping[str, np.ndarray]] | None = None, *,
             calibration_providers: Sequence[str] | None = None) -> Path:
    """Quantize the ONNX model at ``src`` with ``recipe`` (or a preset name) and write ``dst`` atomically.

    Static recipes need ``calibration_inputs``: batches like ``task.calibration_inputs(n, 16, model_args)``;
    their calibration runs on ``calibration_providers`` (default: ONNX Runtime's CPU provider).
    """
    qz = require("onnxruntime.quantization", "cpu", "INT8 quantization")
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise ConfigError(f"quantization preset {recipe!r} is unknown: use one of {sorted(PRESETS)}")
        recipe = PRESETS[recipe]
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"ONNX model {src} does not exist: export the model before quantizing it")
    if recipe.mode == "static" and not calibration_inputs:
        raise ConfigError("static INT8 needs calibration data: set compress.quantize.calibration_batches > 0")
    qtype = {"int8": qz.QuantType.QInt8, "uint8": qz.QuantType.QUInt8}
    op_types = list(recipe.op_types) if recipe.op_types else None
    reduce_range = (not cpu_has_vnni()) if recipe.reduce_range is None else recipe.reduce_range
    with tempfile.TemporaryDirectory(prefix="autoglm-quant-") as workdir, atomic_output(dst) as tmp:
        model_in = _pre_process(src, Path(workdir))
        # quiet: the percentile calibrator prints to stdout, the quantizer warns about pre-processing
        with contextlib.redirect_stdout(io.StringIO()), _ort_logs_quiet():
            if recipe.mode == "dynamic":
                # DefaultTensorType: type inference cannot see through contrib ops (Attention, GQA)
                # every op it knows but Attention, which would become a slower QAttention
                every = sorted(set(qz.registry.IntegerOpsRegistry) - {"Attention"})
                qz.quantize_dynamic(model_in, tmp, op_types_to_quantize=op_types or every,
                                    per_channel=recipe.per_channel, weight_type=qtype[recipe.weight_type],
                                    reduce_range=reduce_range, extra_options={"DefaultTensorType": 1})  # FLOAT
            else:
                method = {"minmax": qz.CalibrationMethod.MinMax, "entropy": qz.CalibrationMethod.Entropy,
                          "percentile": qz.CalibrationMethod.Percentile}[recipe.calibration]
                reader = _Calibration(calibration_inputs, _input_dtypes(model_in))
                qz.quantize_static(model_in, tmp, reader, quant_format=qz.QuantFormat.QDQ,
                                   op_types_to_quantize=op_types, per_channel=recipe.per_channel,
                                   reduce_range=reduce_range, activation_type=qtype[recipe.activation_type],
                                   weight_type=qtype[recipe.weight_type], calibrate_method=method,
                                   extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}
                                   if recipe.symmetric else None,
                                   calibration_providers=list(calibration_providers or ["CPUExecutionProvider"]))
    ops = _op_types(dst)
    if not ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
        # an "INT8" artifact that is FP32 inside would mislead every comparison after it
        dst.unlink()
        raise ConfigError(f"recipe {recipe.name!r} quantized nothing in {src} (ops: {sorted(_op_types(src))}): "
                          f"use preset {choose_preset(src)!r}")
    return dst


@contextlib.contextmanager
def _ort_logs_quiet() -> Iterator[None]:
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs its advice through the root logger
    try:
        yield
    finally:
        root.setLevel(level)


def optimized_ops(onnx_path: Path | str) -> Counter[str]:
    """Op types ONNX Runtime runs for the model after ORT_ENABLE_ALL, with counts.

    QLinearConv, QGemm, QLinearMatMul, DynamicQuantizeMatMul mean INT8 kernels; ops in
    :data:`FP32_COMPUTE_OPS` left in a quantized model mean layers that still run in FP32.
    """
    ort = require("onnxruntime", "cpu", "INT8 quantization")
    onnx = require("onnx", purpose="INT8 quantization")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # it warns that NCHWc layouts are machine-specific; we only count ops
    with tempfile.TemporaryDirectory(prefix="autoglm-ops-") as workdir:
        options.optimized_model_filepath = str(Path(workdir) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
