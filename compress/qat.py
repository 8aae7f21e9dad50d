"""Quantization-aware fine-tuning (QAT) exported as a QDQ ONNX model that ONNX Runtime runs on INT8 kernels.

Every Conv/Linear is wrapped so the forward pass computes what INT8 inference will: weights
fake-quantized per output channel (int8, symmetric; 7-bit where the CPU lacks VNNI, as PTQ does),
biases on the int32 grid ORT gives them (input scale x weight scale), and each layer's output -- after
the ReLU that follows it, which ORT folds into the quantization -- fake-quantized per tensor (uint8,
min/max ranges), as are the model's float inputs. The task's loss and training loop then adapt the
weights to the rounding. The legacy exporter writes each fake-quant op as a QuantizeLinear /
DequantizeLinear pair, which ORT fuses into QLinearConv / QGemm: the layout of post-training static
QDQ (:mod:`compress.quantize`), with weights that learned the grid. Built for Conv/Linear stacks such
as the digits CNN; a ReLU module right after a layer in an ``nn.Sequential`` is fused into it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from autoglm.artifacts import atomic_output
from autoglm.config import QATSettings, QuantizeSettings
from autoglm.errors import ConfigError
from autoglm.tasks.base import Task, TrainResult

if TYPE_CHECKING:
    from autoglm.config import TrainSettings

__all__ = ["QAT_LR_FRAC", "QATModel", "export_qat", "prepare_qat", "qat", "qat_finetune"]

W_QMIN, W_QMAX = -128, 127  # int8 weights, zero point 0: what ORT's INT8 kernels take
A_QMIN, A_QMAX = 0, 255  # uint8 activations, as the PTQ presets use
BITS = range(2, 9)  # below 8 the grid is coarser inside the same int8 containers and INT8 kernels
EMA = 0.05  # range moving-average weight per training step
# the config's defaults (each number, and why it is what it is, lives in autoglm.config)
QAT_LR_FRAC = QATSettings.model_fields["lr_frac"].default
CALIBRATION_BATCHES = QuantizeSettings.model_fields["calibration_batches"].default
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)

log = logging.getLogger(__name__)


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization of activations with an observed min/max range."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.levels = 2**bits - 1  # steps across the observed range
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        self.observing: str | None = "minmax"  # "minmax" (calibration), "ema" (training) or None (frozen)

    def qparams(self) -> tuple[float, int]:
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)  # zero must be exact (padding, ReLU)
        scale = max((hi - lo) / self.levels, 1e-8)
        return scale, int(min(max(round(A_QMIN - lo / scale), A_QMIN), A_QMAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and (self.training or not self.seen):
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if self.seen and self.observing == "minmax":  # calibration: the range of all batches
                    lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
                elif self.seen:  # training: a moving average, so one odd batch does not stretch the grid
                    lo, hi = self.lo + EMA * (lo - self.lo), self.hi + EMA * (hi - self.hi)
                self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, A_QMIN, A_QMAX)


class QATLayer(nn.Module):
    """One Conv/Linear (plus the ReLU after it, if any) computing as its INT8 kernel will."""

    def __init__(self, layer: nn.Module, relu: bool, bits: int, weight_bits: int):
        super().__init__()
        self.layer, self.weight_levels = layer, 2 ** (weight_bits - 1) - 1  # 127 at 8 bits, 63 at 7
        self.act = nn.ReLU() if relu else nn.Identity()
        self.out_fq = ActFakeQuant(bits)
        # whose grid the input is on (set by _link_inputs): a plain reference, not a submodule of this layer
        self.__dict__["input_fq"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.layer.weight, self.layer.bias
        with torch.no_grad():
            absmax = weight.detach().abs().flatten(1).amax(dim=1)  # (out_channels,)
            w_scale = (absmax / self.weight_levels).clamp_min(1e-8)
        zeros = torch.zeros_like(w_scale, dtype=torch.int32)
        weight = torch.fake_quantize_per_channel_affine(weight, w_scale, zeros, 0, W_QMIN, W_QMAX)
        if bias is not None and self.input_fq is not None:  # ORT adds an int32 bias at scale s_in * s_w
            b_scale = self.input_fq.qparams()[0] * w_scale
            bias = bias + (torch.round(bias / b_scale) * b_scale - bias).detach()  # straight-through
        if isinstance(self.layer, nn.Linear):
            y = F.linear(x, weight, bias)
        else:
            y = self.layer._conv_forward(x, weight, bias)
        return self.out_fq(self.act(y))


class QATModel(nn.Module):
    """The wrapped model with its float inputs fake-quantized; same positional inputs and output."""

    def __init__(self, model: nn.Module, n_inputs: int, bits: int = 8):
        super().__init__()
        self.model = model
        self.in_fq = nn.ModuleList(ActFakeQuant(bits) for _ in range(n_inputs))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*(fq(x) if x.is_floating_point() else x for fq, x in zip(self.in_fq, inputs)))

    def observe(self, how: str | None) -> None:
        """Update activation ranges as "minmax" (calibration) or "ema" (training), or freeze them (None)."""
        for module in self.modules():
            if isinstance(module, ActFakeQuant):
                module.observing = how


def _wrap(module: nn.Module, bits: int, weight_bits: int) -> int:
    """Replace Conv/Linear children by QATLayers in place (fusing a following ReLU); returns how many."""
    count = 0
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if isinstance(child, LAYERS):
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            relu = isinstance(module, nn.Sequential) and isinstance(nxt, nn.ReLU)
            setattr(module, name, QATLayer(child, relu, bits, weight_bits))
            if relu:  # the ReLU now lives inside the QATLayer, before its output quantization
                setattr(module, children[i + 1][0], nn.Identity())
            count += 1
        elif not isinstance(child, QATLayer):
            count += _wrap(child, bits, weight_bits)
    return count


def _link_inputs(qmodel: QATModel, args: tuple[torch.Tensor, ...]) -> None:
    """Point each layer at the quantizer whose grid its input lies on (through pooling, flatten, ...).

    Found by running one batch: the most recent fake-quant output before the layer whose scale
    divides the layer's input exactly. A layer whose input is on no grid (a GELU or an add between)
    keeps a float bias, as ORT will run it in FP32.
    """
    events: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = []
    for module in qmodel.modules():
        if isinstance(module, ActFakeQuant):
            hooks.append(module.register_forward_hook(lambda m, _i, out: events.append(("fq", m, out))))
        elif isinstance(module, QATLayer):
            hooks.append(module.register_forward_pre_hook(lambda m, inp: events.append(("in", m, inp[0]))))
    try:
        with torch.no_grad():
            qmodel(*args)
    finally:
        for hook in hooks:
            hook.remove()
    for i, (kind, layer, x) in enumerate(events):
        if kind != "in":
            continue
        for prev_kind, fq, _ in reversed(events[:i]):
            if prev_kind != "fq":
                continue
            steps = x / fq.qparams()[0]
            if torch.allclose(steps, steps.round(), atol=1e-3):
                layer.__dict__["input_fq"] = fq
                break


def prepare_qat(model: nn.Module, task: Task, model_args: Mapping[str, Any],
                calibration_batches: int = CALIBRATION_BATCHES, bits: int = 8,
                reduce_range: bool | None = None) -> QATModel:
    """A fake-quantized copy of ``model`` with ranges set on the task's calibration batches.

    Evaluated as is, it is post-training quantization in torch; :func:`qat_finetune` trains it.
    ``bits`` < 8 puts weights and activations on a coarser grid, still run by INT8 kernels.
    ``reduce_range`` (weights on 7 bits) None: on unless this CPU has VNNI, like the PTQ recipes.
    """
    from compress.quantize import cpu_has_vnni

    if bits not in BITS:
        raise ConfigError(f"compress.qat.bits={bits!r} is invalid: use {BITS.start}..{BITS.stop - 1} (8 for INT8)")
    if calibration_batches < 1:
        raise ConfigError("QAT needs calibration data to start its ranges: set calibration_batches > 0")
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    spec = task.io_spec(model_args)
    qmodel = QATModel(copy.deepcopy(model), len(spec.inputs), bits)
    if _wrap(qmodel.model, bits, min(bits, 7) if reduce_range else bits) == 0:
        raise ConfigError(f"task '{task.name}': the model has no Conv or Linear layer, so QAT has nothing "
                          "to quantize; drop the qat variant")
    qmodel.model_args = dict(model_args)  # the training loop and evaluation read it
    qmodel.observe("minmax")  # the same statistic as ORT's MinMax calibration, on the same batches
    with torch.no_grad():
        for inputs in task.calibration_inputs(calibration_batches, 16, model_args):
            args = tuple(torch.from_numpy(inputs[t.name]) for t in spec.inputs)
            qmodel.train()  # observers update in training mode ...
            for module in qmodel.modules():
                if isinstance(module, nn.Dropout):  # ... but calibration sees the inference-time network
                    module.eval()
            qmodel(*args)
    qmodel.observe(None)
    qmodel.eval()
    _link_inputs(qmodel, args)
    return qmodel


def qat_finetune(qmodel: QATModel, task: Task, train_settings: TrainSettings, steps: int,
                 lr_frac: float = QAT_LR_FRAC) -> TrainResult:
    """Fine-tune with the task's loss and loop at ``lr_frac`` of its lr, no warmup.

    Activation ranges follow a moving average for the first half, then freeze, so the last steps fit
    the weights to the ranges inference will use. Returns the loop's result (metric: quantized val).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"compress.qat.steps={steps!r} is invalid: use an integer >= 2 (e.g. 200)")
    if not 0.0 < lr_frac <= 1.0:
        raise ConfigError(f"compress.qat.lr_frac={lr_frac!r} is invalid: use 0 < lr_frac <= 1 (e.g. 0.2)")
    half = steps // 2
    settings = train_settings.model_copy(update={
        "max_steps": steps, "lr": train_settings.lr * lr_frac, "warmup_frac": 0.0,
        "time_budget_s": None, "eval_every": half})
    qmodel.observe("ema")

    def freeze_at_half(step: int, _value: float) -> bool:
        if step >= half:
            qmodel.observe(None)
        return False

    try:
        return task.train(qmodel, settings, on_eval=freeze_at_half)
    finally:
        qmodel.observe(None)


def export_qat(qmodel: QATModel, task: Task, model_args: Mapping[str, Any], dst: Path | str) -> Path:
    """Write the QDQ ONNX of a QAT model to ``dst`` (atomically) and return ``dst``.

    The legacy exporter maps fake-quant ops to Q/DQ pairs (dynamo has no such mapping). Two fixes make
    ORT fuse every layer as it does for post-training QDQ: Flatten becomes Reshape (ORT moves a DQ
    through Reshape, not through Flatten, so a Linear after a flatten would stay FP32), and ORT's basic,
    hardware-independent optimizations fold the weight quantization into int8 initializers (a file the
    size of the PTQ one, instead of FP32 weights quantized at load time).
    """
    import onnx
    import onnxruntime as ort

    from compress.export import export_onnx
    from compress.quantize import FP32_COMPUTE_OPS, optimized_ops

    qmodel.observe(None)
    qmodel.eval()
    with tempfile.TemporaryDirectory(prefix="autoglm-qat-") as workdir:
        raw, reshaped = Path(workdir) / "raw.onnx", Path(workdir) / "reshaped.onnx"
        export_onnx(qmodel, task, model_args, raw, exporter="legacy")
        graph_model = onnx.load(str(raw))
        _flatten_to_reshape(graph_model.graph)
        onnx.save(graph_model, str(reshaped))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        with atomic_output(dst) as tmp:
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(reshaped), options, providers=["CPUExecutionProvider"])
    fp32 = {op: n for op, n in optimized_ops(dst).items() if op in FP32_COMPUTE_OPS}
    if fp32:  # correct, but those layers dequantize, compute in FP32 and requantize: slower than PTQ
        log.warning("%s: ORT runs %s in FP32 (their inputs are not quantized tensors); QAT export is built "
                    "for Conv/Linear stacks, use compress.quantize for other models", dst, fp32)
    return Path(dst)


def _flatten_to_reshape(graph) -> None:
    """Flatten(axis=1) -> Reshape(shape=[0, -1]), the same tensor for every input with a batch axis."""
    import numpy as np
    from onnx import helper, numpy_helper

    for index, node in enumerate(list(graph.node)):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type != "Flatten" or axis != 1:
            continue
        shape = f"{node.name or node.output[0]}_reshape_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("Reshape", [node.input[0], shape], list(node.output),
                                                  name=node.name))


def qat(model: nn.Module, task: Task, model_args: Mapping[str, Any], train_settings: TrainSettings,
        steps: int, dst: Path | str, calibration_batches: int = CALIBRATION_BATCHES, bits: int = 8,
        lr_frac: float = QAT_LR_FRAC) -> Path:
    """Quantization-aware fine-tuning of ``model`` for ``steps`` steps; writes the INT8 QDQ ONNX to ``dst``.

    ``model`` itself is not changed (a copy is trained): see :func:`prepare_qat`, :func:`qat_finetune`
    and :func:`export_qat` for the steps, which callers that also want the metrics can run themselves.
    ``steps=0`` only calibrates the ranges: the same graph without the fine-tune (post-training QDQ in torch).
    """
    qmodel = prepare_qat(model, task, model_args, calibration_batches, bits)
    if steps != 0:
        qat_finetune(qmodel, task, train_settings, steps, lr_frac)
    return export_qat(qmodel, task, model_args, dst)
