"""trt-fp16, trt-int8: TensorRT engines, where TensorRT and CUDA exist (:mod:`compress.tensorrt`); elsewhere they
are skipped with the reason. INT8 engines come from a static QDQ graph of their own (symmetric int8, the
``tensorrt-int8-static`` preset): explicit quantization, no TensorRT calibrator.
"""

from __future__ import annotations

from pathlib import Path

from compress.registry import Pass, register, variant
from compress.variants import Variant, VariantBuilder


def _available() -> tuple[bool, str]:
    from compress.tensorrt import tensorrt_status

    return tensorrt_status()


register(Pass("tensorrt", available=_available))


def _engine(builder: VariantBuilder, name: str, precision: str, src: Path) -> Variant:
    from compress.tensorrt import build_engine

    plan = build_engine(src, builder.out / f"{name}.plan", builder.task.io_spec(builder.model_args), precision,
                        max_batch=builder.cfg.triton.max_batch_size)
    return Variant(name, plan, {"pass": "tensorrt", "precision": precision, "source": src.name})


@variant("trt-fp16", passes=("export", "tensorrt"))
def trt_fp16(builder: VariantBuilder, name: str) -> Variant:
    return _engine(builder, name, "fp16", builder.fp32())


@variant("trt-int8", passes=("export", "quantize", "tensorrt"), calibrates=True)
def trt_int8(builder: VariantBuilder, name: str) -> Variant:
    from compress.quantize import TENSORRT_INT8, quantize

    # TensorRT parses only symmetric int8 QDQ: its own static graph, not the CPU's (uint8, asymmetric)
    qdq = builder.memo("tensorrt-qdq", lambda: quantize(
        builder.fp32(), builder.out / "int8-tensorrt.onnx", TENSORRT_INT8, builder.calibration(),
        calibration_providers=builder.calibration_providers))
    return _engine(builder, name, "int8", qdq)
