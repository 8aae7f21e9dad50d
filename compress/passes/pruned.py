"""pruned, pruned-int8: channels removed (physically narrower layers) and fine-tuned, then exported; pruned-int8
quantizes that export as int8 does (:mod:`compress.prune`, :mod:`compress.quantize`); pruned-qat
(compress/passes/pruned_qat.py) fine-tunes it fake-quantized. A trial's ``prune.ratio`` knob at 0 prunes nothing.
"""

from __future__ import annotations

import copy
from typing import Any

from autoglm.config import PruneSettings
from autoglm.tasks.base import Knob
from compress.passes.int8 import MODES, quantized, static_by_graph
from compress.registry import Pass, register, setting, variant
from compress.variants import Variant, VariantBuilder


def _prunable(task, model) -> tuple[bool, str]:
    from compress.prune import prunable  # torch: loaded only where a model is

    return prunable(task, model)


register(Pass("prune", knobs={
    # 0 = off (a step keeps 0 reachable: a continuous range never samples it); beyond 3/4 the models collapse
    "ratio": Knob("float", 0.0, low=0.0, high=0.75, step=0.25),
    "finetune_steps": setting(PruneSettings, "finetune_steps", low=50, high=1000, log=True),  # 50 recover digits
}, searched=("ratio",), switch="ratio", untrained={"finetune_steps": 0}, applies=_prunable))


def pruned_model(builder: VariantBuilder) -> tuple[Any, dict[str, Any]]:
    """The model pruned and fine-tuned once per builder (pruned, pruned-int8 and pruned-qat share it), and its
    recipe."""

    def prune():
        from compress.prune import count_params, prune_and_finetune

        p = builder.cfg.prune
        model, result = prune_and_finetune(copy.deepcopy(builder.model), builder.task, builder.model_args, p.ratio,
                                           builder.settings.train, p.finetune_steps, lr_frac=p.finetune_lr_frac)
        return model, {"pass": "prune", "ratio": p.ratio, "finetune_steps": p.finetune_steps,
                       "params_before": count_params(builder.model), "params_after": count_params(model),
                       "finetune_wall_s": result.wall_s}

    return builder.memo("pruned", prune)


@variant("pruned", passes=("prune", "export"), tuned=True)
def pruned(builder: VariantBuilder, name: str) -> Variant:
    model, recipe = pruned_model(builder)
    return Variant(name, builder.export(model, "pruned"), recipe)


@variant("pruned-int8", passes=("prune", "export", "quantize"), modes={"quantize": MODES}, tuned=True,
         calibrates=static_by_graph)
def pruned_int8(builder: VariantBuilder, name: str) -> Variant:
    model, recipe = pruned_model(builder)
    variant = quantized(builder, builder.export(model, "pruned"), name, None)
    variant.recipe = {**recipe, "then": variant.recipe}
    return variant
