"""trt-fp16, trt-int8: TensorRT engines, where TensorRT and CUDA exist (:mod:`compress.tensorrt`); elsewhere they
are skipped with the reason. INT8 engines come from the static QDQ graph: explicit quantization, no TensorRT
calibrator.
"""

from __future__ import annotations

from pathlib import Path

from compress.passes.int8 import quantized
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
    return _engine(builder, name, "int8", quantized(builder, builder.fp32(), "int8-static", "static").path)
