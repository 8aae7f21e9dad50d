"""int8, int8-dynamic, int8-static: post-training INT8 of the FP32 export with ONNX Runtime (:mod:`compress.quantize`).

int8 takes compress.quantize.mode, or under 'auto' its preset (named, or chosen by the graph's ops: static QDQ
for a CNN, dynamic for a transformer); int8-dynamic and int8-static fix the mode. A trial's ``quantize.mode``
knob says dynamic, static, none (no INT8), qat (the qat variants of compress/passes/qat.py and
pruned_qat.py: a fake-quantized fine-tune instead of post-training INT8) or int4 (compress/passes/int4.py:
INT4 weights instead of INT8).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from autoglm.config import CompressSettings, QuantizeSettings
from autoglm.tasks.base import Knob
from compress.registry import Pass, register, setting, variant
from compress.variants import Variant, VariantBuilder

OFF = "none"
# a trial quantizes one way or the other, or not at all: "auto" (by the graph) is for a configured int8
MODES = tuple(m for m in get_args(QuantizeSettings.model_fields["mode"].annotation) if m != "auto")
# a trial's third way to INT8: it selects the qat variants (their settings are compress.qat's) and costs a
# fine-tune, so tune's presets leave it out and tune.space opts in; QAT's export is built for Conv/Linear stacks
QAT = "qat"
# a trial's way to INT4 weights: it selects the int4 variants (compress/passes/int4.py, settings compress.int4);
# opt-in, for decoders: 4-bit weights pay at batch 1, where decoding reads every weight per token
INT4 = "int4"

register(Pass("quantize", knobs={
    "mode": Knob("categorical", OFF, choices=(OFF, *MODES, QAT, INT4)),
    "calibration": setting(QuantizeSettings, "calibration"),  # used by static only
    "per_channel": setting(QuantizeSettings, "per_channel"),
}, searched=("mode",), opt_in={"mode": (QAT, INT4)}, switch="mode", selects=(QAT, INT4)))


def static_by_graph(cfg: CompressSettings) -> bool:
    """int8 and pruned-int8 go static by the graph (a CNN's) unless the mode says dynamic."""
    return cfg.quantize.mode != "dynamic"


def quantized(builder: VariantBuilder, src: Path, name: str, mode: str | None) -> Variant:
    """The FP32 graph ``src`` quantized into ``<name>.onnx``; ``mode`` None: compress.quantize decides."""
    from compress.quantize import PRESETS, choose_preset, cpu_has_vnni, quantize, recipe_for

    q = builder.cfg.quantize
    mode = mode or (None if q.mode == "auto" else q.mode)
    if mode is None and q.preset:
        recipe = PRESETS[q.preset]
    else:
        mode = mode or PRESETS[choose_preset(src)].mode
        recipe = recipe_for(src, mode, q.calibration, q.per_channel)
    dst = quantize(src, builder.out / f"{name}.onnx", recipe,
                   builder.calibration() if recipe.mode == "static" else None,
                   calibration_providers=builder.calibration_providers)
    # record what this machine decided: reduce_range None means "on unless the CPU has VNNI"
    reduce_range = (not cpu_has_vnni()) if recipe.reduce_range is None else recipe.reduce_range
    return Variant(name, dst, {"pass": "quantize", "recipe": recipe.name, "mode": recipe.mode,
                               "calibration": recipe.calibration, "per_channel": recipe.per_channel,
                               "op_types": recipe.op_types, "reduce_range": reduce_range, "why": recipe.why})


@variant("int8", passes=("export", "quantize"), calibrates=static_by_graph)
def int8(builder: VariantBuilder, name: str) -> Variant:
    return quantized(builder, builder.fp32(), name, None)


@variant("int8-dynamic", passes=("export", "quantize"), modes={"quantize": ("dynamic",)}, tuned=True)
def int8_dynamic(builder: VariantBuilder, name: str) -> Variant:
    return quantized(builder, builder.fp32(), name, "dynamic")


@variant("int8-static", passes=("export", "quantize"), modes={"quantize": ("static",)}, tuned=True,
         calibrates=True)
def int8_static(builder: VariantBuilder, name: str) -> Variant:
    return quantized(builder, builder.fp32(), name, "static")
