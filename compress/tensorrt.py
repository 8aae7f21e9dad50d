"""TensorRT engines (FP16, INT8) from the exported ONNX, where TensorRT and CUDA exist.

Elsewhere :func:`tensorrt_status` says why not, and the stage records that reason in its manifest
instead of producing anything: an engine is never faked. INT8 engines are built from the static QDQ
ONNX (explicit quantization: the scales come from the graph, so no TensorRT calibrator is needed).
Engines are executed through torch's CUDA tensors, so no extra CUDA binding is required.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from autoglm.artifacts import write_atomic
from autoglm.errors import AutoGLMError
from autoglm.tasks import IOSpec, Predictor

Precision = Literal["fp16", "int8"]


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason it is not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed (on a CUDA host: pip install 'autoglm[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch on this host"
    return True, ""


def _shape(dims: tuple[int, ...], batch: int, dynamic: int) -> tuple[int, ...]:
    return (batch, *(dynamic if d == -1 else d for d in dims))


def build_engine(onnx_path: Path | str, plan_path: Path | str, io: IOSpec, precision: Precision, *,
                 max_batch: int = 64, opt_batch: int = 16, max_dynamic: int = 256, opt_dynamic: int = 64,
                 workspace_bytes: int = 1 << 30) -> Path:
    """Build and serialize an engine with one optimization profile spanning batch 1..max_batch."""
    ok, reason = tensorrt_status()
    if not ok:
        raise AutoGLMError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AutoGLMError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines keep FP16 for the layers left unquantized
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for spec in io.inputs:
        profile.set_shape(spec.name, _shape(spec.shape, 1, 1), _shape(spec.shape, opt_batch, opt_dynamic),
                          _shape(spec.shape, max_batch, max_dynamic))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AutoGLMError(f"TensorRT failed to build a {precision} engine from {onnx_path} (see its log above)")
    return write_atomic(plan_path, bytes(serialized))


def engine_predictor(plan_path: Path | str, io: IOSpec) -> Predictor:
    """Run a serialized engine on numpy inputs (device buffers are torch CUDA tensors)."""
    ok, reason = tensorrt_status()
    if not ok:
        raise AutoGLMError(f"cannot run a TensorRT engine: {reason}")
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def predict(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        device_inputs = {s.name: torch.from_numpy(np.ascontiguousarray(inputs[s.name])).cuda() for s in io.inputs}
        for name, tensor in device_inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for spec in io.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            outputs[spec.name] = torch.empty(shape, dtype=getattr(torch, spec.dtype), device="cuda")
            context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise AutoGLMError(f"TensorRT execution failed for {plan_path}")
        stream.synchronize()
        return outputs[io.outputs[0].name].cpu().numpy()

    return predict
