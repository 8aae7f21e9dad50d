"""qat: quantization-aware fine-tuning, exported as an INT8 QDQ graph (:mod:`compress.qat`). A trial selects it
with ``quantize.mode`` 'qat' (an opt-in choice: it costs a fine-tune); its steps are ``qat.steps``."""

from __future__ import annotations

from typing import Any

from autoglm.config import QATSettings
from compress.passes.int8 import QAT
from compress.registry import Pass, register, setting, variant
from compress.variants import Variant, VariantBuilder

# steps=0 only calibrates the ranges: the same QDQ graph, untrained (what a trial's probe times)
register(Pass("qat", knobs={"steps": setting(QATSettings, "steps", low=50, high=1000, log=True)},
              untrained={"steps": 0}))


def fake_quantized(builder: VariantBuilder, model: Any, name: str) -> Variant:
    """``model`` fine-tuned fake-quantized and exported as the QDQ graph ``<name>.onnx``."""
    from compress.qat import qat as fine_tuned

    q, cfg = builder.cfg.qat, builder.cfg
    # QAT starts its ranges on calibration batches even where static INT8 is not configured
    path = fine_tuned(model, builder.task, builder.model_args, builder.settings.train, q.steps,
                      builder.out / f"{name}.onnx", calibration_batches=max(cfg.quantize.calibration_batches, 1),
                      lr_frac=q.lr_frac)
    return Variant(name, path, {"pass": "qat", "steps": q.steps, "lr_frac": q.lr_frac})


@variant("qat", passes=("qat", "quantize"), modes={"quantize": (QAT,)}, tuned=True)
def qat(builder: VariantBuilder, name: str) -> Variant:
    return fake_quantized(builder, builder.model, name)
