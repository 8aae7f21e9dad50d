"""qat: quantization-aware fine-tuning, exported as an INT8 QDQ graph (:mod:`compress.qat`)."""

from __future__ import annotations

from compress.registry import Pass, register, variant
from compress.variants import Variant, VariantBuilder

register(Pass("qat"))


@variant("qat", passes=("qat",))
def qat(builder: VariantBuilder, name: str) -> Variant:
    from compress.qat import qat as fine_tuned

    q, cfg = builder.cfg.qat, builder.cfg
    # QAT starts its ranges on calibration batches even where static INT8 is not configured
    path = fine_tuned(builder.model, builder.task, builder.model_args, builder.settings.train, q.steps,
                      builder.out / "qat.onnx", calibration_batches=max(cfg.quantize.calibration_batches, 1),
                      lr_frac=q.lr_frac)
    return Variant(name, path, {"pass": "qat", "steps": q.steps, "lr_frac": q.lr_frac})
