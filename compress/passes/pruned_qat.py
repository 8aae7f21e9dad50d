"""pruned-qat: the pruned, fine-tuned model (the one pruned and pruned-int8 share) fine-tuned again fake-quantized
and exported as an INT8 QDQ graph: narrower layers on INT8 kernels, with weights that learned the grid. A trial
selects it with ``prune.ratio`` > 0 and ``quantize.mode`` 'qat'."""

from __future__ import annotations

from compress.passes.int8 import QAT
from compress.passes.pruned import pruned_model
from compress.passes.qat import fake_quantized
from compress.registry import variant
from compress.variants import Variant, VariantBuilder


@variant("pruned-qat", passes=("prune", "qat", "quantize"), modes={"quantize": (QAT,)}, tuned=True)
def pruned_qat(builder: VariantBuilder, name: str) -> Variant:
    model, recipe = pruned_model(builder)
    variant = fake_quantized(builder, model, name)
    variant.recipe = {**recipe, "then": variant.recipe}
    return variant
