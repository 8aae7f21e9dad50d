"""int4, pruned-int4: INT4 weight-only quantization of the FP32 export (or the pruned one) with ONNX Runtime's
MatMulNBits (:mod:`compress.int4`), judged by the task's metric like every variant. A trial selects them with
``quantize.mode`` 'int4', an opt-in choice: tune's presets leave it out (``tune.space`` brings it in), since
4-bit weights pay where one row is computed per weight read (a decoder's batch-1 step, which the decode graphs
try on their own: compress.generate.int4); a CNN has no MatMul weights to quantize. Knobs: ``int4.block_size``,
``int4.symmetric``, ``int4.accuracy_level``, ``int4.keep_head``, read from compress.int4.
"""

from __future__ import annotations

from pathlib import Path

from autoglm.config import Int4Settings
from compress.passes.int8 import INT4
from compress.passes.pruned import pruned_model
from compress.registry import Pass, register, setting, variant
from compress.variants import Variant, VariantBuilder

register(Pass("int4", knobs={key: setting(Int4Settings, key) for key in Int4Settings.model_fields}))


def int4_quantized(builder: VariantBuilder, src: Path, name: str) -> Variant:
    """The FP32 graph ``src`` with INT4 MatMul weights, as ``<name>.onnx``; skipped, with the reason, where the
    graph has no MatMul weight to quantize (a CNN's convolutions and Gemm head stay as they are)."""
    from compress.int4 import Int4Recipe, NothingToQuantize, quantize_int4

    recipe = Int4Recipe.of(builder.cfg.int4)
    try:
        path = quantize_int4(src, builder.out / f"{name}.onnx", recipe)
    except NothingToQuantize:
        return Variant(name, None, {"pass": "int4"}, status="skipped",
                       reason="no MatMul with a constant weight to quantize (INT4 is for transformers' MatMuls; "
                              "int8 suits this model)")
    return Variant(name, path, {"pass": "int4", **recipe.to_dict()})


@variant("int4", passes=("export", "quantize", "int4"), modes={"quantize": (INT4,)}, tuned=True)
def int4(builder: VariantBuilder, name: str) -> Variant:
    return int4_quantized(builder, builder.fp32(), name)


@variant("pruned-int4", passes=("prune", "export", "quantize", "int4"), modes={"quantize": (INT4,)}, tuned=True)
def pruned_int4(builder: VariantBuilder, name: str) -> Variant:
    model, recipe = pruned_model(builder)
    variant = int4_quantized(builder, builder.export(model, "pruned"), name)
    variant.recipe = {**recipe, "then": variant.recipe}
    return variant
