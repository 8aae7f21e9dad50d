"""fp32: the model exported to ONNX as it is, parity-checked against torch (:mod:`compress.export`)."""

from __future__ import annotations

from compress.registry import Pass, register, variant
from compress.variants import Variant, VariantBuilder

register(Pass("export"))


@variant("fp32", passes=("export",), tuned=True)
def fp32(builder: VariantBuilder, name: str) -> Variant:
    return Variant(name, builder.fp32(), {"pass": "export", "exporter": builder.cfg.exporter,
                                          "nodes": builder.nodes.get("fp32")})
