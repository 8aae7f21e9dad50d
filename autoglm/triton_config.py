"""Triton model configs as typed objects, rendered through Triton's own protobuf.

The config is never written by hand. :class:`ModelConfig` checks itself at construction, is turned
into Triton's own protobuf message (``tritonclient.grpc.model_config_pb2.ModelConfig``) and printed
with ``google.protobuf.text_format``, so every rendered file is a valid Triton config by construction.

Flavours: ``python`` runs ONNX Runtime inside Triton's python backend (the only way on pip-only hosts,
whose Triton has no onnxruntime backend); ``onnxruntime`` and ``tensorrt`` are the native backends of
the NGC container. :mod:`compress.repository` writes them with their model files. On a GPU, instance groups
are KIND_GPU with device ids, and the onnxruntime flavour can run TensorRT as its execution accelerator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from autoglm._lazy import require
from autoglm.errors import ConfigError
from autoglm.tasks.base import IOSpec, TensorSpec

Flavour = Literal["python", "onnxruntime", "tensorrt"]
FLAVOURS = ("python", "onnxruntime", "tensorrt")
MODEL_FILES = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
THREAD_PARAMETERS = ("intra_op_threads", "inter_op_threads")
# The native onnxruntime backend names the same knobs differently; one config means one thing everywhere.
_ORT_BACKEND_NAMES = {"intra_op_threads": "intra_op_thread_count", "inter_op_threads": "inter_op_thread_count"}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "object": "TYPE_STRING", "bytes": "TYPE_STRING",
}


def triton_dtype(dtype: str) -> str:
    """numpy dtype name -> Triton ``TYPE_*`` name; ConfigError naming the supported ones otherwise."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    key = "bytes" if name.startswith("bytes") else name
    if key not in _TRITON_TYPES:
        raise ConfigError(f"dtype {dtype!r} has no Triton type: use one of {sorted(_TRITON_TYPES)}")
    return _TRITON_TYPES[key]


def _positive_sizes(what: str, sizes: tuple[int, ...], limit: int) -> None:
    for size in sizes:
        if not isinstance(size, int) or not 1 <= size <= limit:
            raise ConfigError(f"{what} {size!r} must be an integer in 1..max_batch_size={limit}: "
                              f"lower it or raise max_batch_size")


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher. ``max_queue_size`` > 0 bounds the queue so overload is rejected.

    The default is 0 (unbounded): measured with the bundled Triton 2.51, any queue bound or timeout
    makes the batcher stall ~500 ms about every 0.5 s (p99 505 ms vs 6 ms at concurrency 1), so load is
    bounded at the gateway instead (``max_in_flight``, 503 + Retry-After)."""

    max_queue_delay_us: int = 0  # 0 is the best all-round default; a delay costs its full length at low load
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0  # 0: unbounded (see above)
    default_timeout_us: int = 0  # 0: requests never time out in the queue

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes", tuple(self.preferred_batch_sizes))
        for key in ("max_queue_delay_us", "max_queue_size", "default_timeout_us"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"dynamic_batching.{key}={value!r} must be a non-negative integer")


@dataclass(frozen=True)
class InstanceGroup:
    """How many copies of the model run, and where: ``count`` instances on each GPU in ``gpus`` (Triton's
    device ids; empty: every GPU Triton sees) for kind gpu, or on the CPU."""

    count: int = 1
    kind: Literal["cpu", "gpu"] = "cpu"
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"instance_group.count={self.count!r} must be >= 1: use 1 or more instances")
        if self.kind not in ("cpu", "gpu"):
            raise ConfigError(f"instance_group.kind={self.kind!r} is unknown: use 'cpu' or 'gpu'")
        if self.gpus and self.kind != "gpu":
            raise ConfigError(f"instance_group.gpus={list(self.gpus)} places instances on GPUs: set kind='gpu' or "
                              "drop the gpus")
        if any(not isinstance(g, int) or g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise ConfigError(f"instance_group.gpus={list(self.gpus)} must be distinct GPU ids >= 0")


Precision = Literal["FP32", "FP16", "INT8"]


@dataclass(frozen=True)
class TensorRTAccelerator:
    """The native ONNX Runtime backend's TensorRT execution accelerator (GPU instances only): TensorRT runs
    what it supports of the graph, in ``precision`` where chosen (INT8 for static QDQ graphs), and the CUDA
    provider the rest. ``cache`` keeps built engines beside the model, so a restart does not rebuild them."""

    precision: Precision = "FP16"
    workspace_bytes: int = 1 << 30
    cache: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("FP32", "FP16", "INT8"):
            raise ConfigError(f"TensorRT precision {self.precision!r} is unknown: use FP32, FP16 or INT8")
        if not isinstance(self.workspace_bytes, int) or self.workspace_bytes < 1 << 20:
            raise ConfigError(f"TensorRT workspace {self.workspace_bytes!r} bytes is too small: use >= 1 MiB")

    def parameters(self) -> dict[str, str]:
        """The accelerator's parameters as the onnxruntime backend reads them."""
        params = {"precision_mode": self.precision, "max_workspace_size_bytes": str(self.workspace_bytes)}
        if self.cache:
            params |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": "/tmp/autoglm-trt-cache"}
        return params


@dataclass(frozen=True)
class ModelConfig:
    """One served model. Tensor shapes exclude the batch axis; -1 marks a dynamic axis."""

    name: str
    io: IOSpec
    flavour: Flavour = "python"
    max_batch_size: int = 64
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_group: InstanceGroup = field(default_factory=InstanceGroup)
    parameters: dict[str, str] = field(default_factory=dict)
    warmup_batch_sizes: tuple[int, ...] = (1,)
    decoupled: bool = False  # the model answers a request with any number of responses (streaming)
    optional_inputs: tuple[str, ...] = ()  # inputs a request may leave out
    tensorrt: TensorRTAccelerator | None = None  # onnxruntime flavour on GPUs: TensorRT as execution accelerator
    versions: tuple[int, ...] = ()  # version_policy specific: the versions Triton serves; () = its default (latest)

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup_batch_sizes", tuple(self.warmup_batch_sizes))
        object.__setattr__(self, "optional_inputs", tuple(self.optional_inputs))
        object.__setattr__(self, "versions", tuple(self.versions))
        if any(not isinstance(v, int) or v < 1 for v in self.versions):
            raise ConfigError(f"model versions {self.versions} must be integers >= 1 (version directories)")
        object.__setattr__(self, "parameters", {str(k): str(v) for k, v in self.parameters.items()})
        if not _NAME.fullmatch(self.name or "") or self.name.startswith("."):
            raise ConfigError(f"model name {self.name!r} is not a safe directory name: use only letters, digits, "
                              f"'_', '.' and '-', not starting with '.'")
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"flavour {self.flavour!r} is unknown: use one of {list(FLAVOURS)}")
        if self.max_batch_size == 0 and (self.dynamic_batching is not None or self.warmup_batch_sizes):
            raise ConfigError("max_batch_size=0 (the model batches by itself) takes no dynamic_batching and no "
                              "warmup batches: drop them")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size={self.max_batch_size!r} must be >= 1 (the batch axis is always "
                              f"dynamic here), or 0 for a model that batches by itself")
        unknown = set(self.optional_inputs) - {s.name for s in self.io.inputs}
        if unknown:
            raise ConfigError(f"optional inputs {sorted(unknown)} are not inputs of model '{self.name}'")
        if self.dynamic_batching is not None:
            _positive_sizes("preferred batch size", self.dynamic_batching.preferred_batch_sizes, self.max_batch_size)
        _positive_sizes("warmup batch size", self.warmup_batch_sizes, self.max_batch_size)
        self._check_io()
        self._check_parameters()

    def _check_io(self) -> None:
        for group, specs in (("input", self.io.inputs), ("output", self.io.outputs)):
            if not specs:
                raise ConfigError(f"model '{self.name}' has no {group}s: the IOSpec needs at least one")
            names = [s.name for s in specs]
            if len(set(names)) != len(names) or not all(names):
                raise ConfigError(f"model '{self.name}' {group} names {names} must be non-empty and unique")
            for spec in specs:
                triton_dtype(spec.dtype)
                if any(not isinstance(d, int) or (d < 1 and d != -1) for d in spec.shape):
                    raise ConfigError(f"{group} '{spec.name}' shape {spec.shape} is invalid: use sizes >= 1, "
                                      f"or -1 for a dynamic axis (the batch axis is left out)")

    def _check_parameters(self) -> None:
        for key in THREAD_PARAMETERS:
            value = self.parameters.get(key)
            if value is not None and not value.isdigit():
                raise ConfigError(f"parameter {key}={value!r} must be a non-negative integer (0: runtime default)")
        if self.flavour != "python" and "EXECUTION_ENV_PATH" in self.parameters:
            raise ConfigError("EXECUTION_ENV_PATH applies only to the python flavour: drop it or use flavour='python'")
        if self.tensorrt is not None and (self.flavour != "onnxruntime" or self.instance_group.kind != "gpu"):
            raise ConfigError("the TensorRT execution accelerator belongs to the onnxruntime flavour on GPU instances:"
                              " set flavour='onnxruntime' and instance_group.kind='gpu', or drop it")
        if self.flavour == "tensorrt":
            if self.instance_group.kind != "gpu":
                raise ConfigError("a tensorrt_plan model runs only on a GPU: set instance_group.kind='gpu'")
            if set(THREAD_PARAMETERS) & set(self.parameters):
                raise ConfigError("thread parameters do not apply to TensorRT engines: drop them")

    @property
    def model_file(self) -> str:
        """File name of the model inside the version directory."""
        return MODEL_FILES[self.flavour]


def serving_instances(count: int, gpu: int | None) -> InstanceGroup:
    """``count`` instances on GPU ``gpu`` (KIND_GPU with that device id), or on the CPU for None."""
    return InstanceGroup(count, "cpu") if gpu is None else InstanceGroup(count, "gpu", (gpu,))


def _pb() -> Any:
    return require("tritonclient.grpc.model_config_pb2", purpose="rendering Triton model configs")


def _add_tensor(message: Any, spec: TensorSpec, pb: Any) -> None:
    message.name = spec.name
    message.data_type = pb.DataType.Value(triton_dtype(spec.dtype))
    if spec.shape:
        message.dims.extend(spec.shape)
    else:  # a scalar per batch row: Triton needs dims, so declare [1] and reshape it away
        message.dims.append(1)
        message.reshape.SetInParent()


def to_protobuf(cfg: ModelConfig) -> Any:
    """``cfg`` as Triton's ``ModelConfig`` protobuf message."""
    pb = _pb()
    msg = pb.ModelConfig(name=cfg.name, max_batch_size=cfg.max_batch_size)
    if cfg.flavour == "python":
        msg.backend = "python"
    else:
        msg.platform = "onnxruntime_onnx" if cfg.flavour == "onnxruntime" else "tensorrt_plan"
        msg.default_model_filename = cfg.model_file
    for spec in cfg.io.inputs:
        _add_tensor(msg.input.add(), spec, pb)
        msg.input[-1].optional = spec.name in cfg.optional_inputs
    if cfg.decoupled:
        msg.model_transaction_policy.decoupled = True
    for spec in cfg.io.outputs:
        _add_tensor(msg.output.add(), spec, pb)
    if cfg.dynamic_batching is not None:
        _set_batching(msg, cfg.dynamic_batching, pb)
    if cfg.versions:
        msg.version_policy.specific.versions.extend(cfg.versions)
    group = msg.instance_group.add()
    group.count = cfg.instance_group.count
    group.kind = pb.ModelInstanceGroup.KIND_GPU if cfg.instance_group.kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    group.gpus.extend(cfg.instance_group.gpus)
    if cfg.tensorrt is not None:
        accelerator = msg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        for key, value in cfg.tensorrt.parameters().items():
            accelerator.parameters[key] = value
    for key, value in sorted(cfg.parameters.items()):
        if cfg.flavour == "onnxruntime":
            key = _ORT_BACKEND_NAMES.get(key, key)
        msg.parameters[key].string_value = value
    for batch in cfg.warmup_batch_sizes:
        warmup = msg.model_warmup.add(name=f"warmup_batch_{batch}", batch_size=batch, count=1)
        for spec in cfg.io.inputs:
            data = warmup.inputs[spec.name]
            data.data_type = pb.DataType.Value(triton_dtype(spec.dtype))
            data.dims.extend([1 if d == -1 else d for d in spec.shape] or [1])  # dynamic axes warm up at 1
            # Random floats exercise real kernels; integer inputs are usually indices (token ids), where
            # random values could fall outside the vocabulary, so they warm up with zeros.
            if np.dtype(spec.dtype).kind == "f":
                data.random_data = True
            else:
                data.zero_data = True
    return msg


def _set_batching(msg: Any, db: DynamicBatching, pb: Any) -> None:
    msg.dynamic_batching.Clear()
    msg.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_sizes)
    msg.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_us
    if db.max_queue_size or db.default_timeout_us:  # an empty policy keeps Triton's unbounded queue
        policy = msg.dynamic_batching.default_queue_policy
        policy.max_queue_size = db.max_queue_size
        policy.default_timeout_microseconds = db.default_timeout_us
        policy.timeout_action = pb.ModelQueuePolicy.REJECT


def with_serving_knobs(text: str, *, max_batch_size: int, batching: DynamicBatching, instances: int) -> str:
    """``config.pbtxt`` text with its serving knobs replaced: max batch size, dynamic batching and the instance
    count. Everything else (tensors, backend, device placement, accelerators, warm-up) stays as written, so a
    GPU or TensorRT config keeps its placement."""
    msg = parse_pbtxt(text)
    if not msg.HasField("dynamic_batching"):
        raise ConfigError(f"model '{msg.name}' has no dynamic batching (it batches by itself): its serving knobs "
                          "cannot be set")
    _positive_sizes("dynamic_batching.preferred_batch_sizes", tuple(batching.preferred_batch_sizes), max_batch_size)
    if not isinstance(instances, int) or instances < 1:
        raise ConfigError(f"instance_group.count={instances!r} must be >= 1: use 1 or more instances")
    msg.max_batch_size = max_batch_size
    _set_batching(msg, batching, _pb())
    for group in msg.instance_group:
        group.count = instances
    text_format = require("google.protobuf.text_format", purpose="rendering Triton model configs")
    return text_format.MessageToString(msg)


def with_model_parameters(text: str, *, parameters: dict[str, str], instances: int) -> str:
    """``config.pbtxt`` text with these model parameters (ones it has already) and instance count replaced: the
    generation model's serving knobs (it batches by itself). Everything else stays as written."""
    msg = parse_pbtxt(text)
    unknown = sorted(set(parameters) - set(msg.parameters))
    if unknown:
        raise ConfigError(f"model '{msg.name}' has no parameters {unknown}: regenerate it with `autoglm compress "
                          "--force`")
    if not isinstance(instances, int) or instances < 1:
        raise ConfigError(f"instance_group.count={instances!r} must be >= 1: use 1 or more instances")
    for name, value in parameters.items():
        msg.parameters[name].string_value = str(value)
    for group in msg.instance_group:
        group.count = instances
    text_format = require("google.protobuf.text_format", purpose="rendering Triton model configs")
    return text_format.MessageToString(msg)


def render_pbtxt(cfg: ModelConfig) -> str:
    """The ``config.pbtxt`` text of ``cfg``."""
    text_format = require("google.protobuf.text_format", purpose="rendering Triton model configs")
    return text_format.MessageToString(to_protobuf(cfg))


def parse_pbtxt(text: str) -> Any:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` protobuf (raises on invalid text)."""
    text_format = require("google.protobuf.text_format", purpose="reading Triton model configs")
    return text_format.Parse(text, _pb().ModelConfig())
