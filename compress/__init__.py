"""compress: torch -> ONNX (parity-gated), INT8 (static QDQ, dynamic), structurally pruned, QAT (alone
or after pruning) and TensorRT variants, and the Triton model repository.

Each variant and the passes it applies are registered once, under ``compress/passes``; the config check,
tune's knobs and a trial's variant come from that registry. Import cost is kept low (tune calls this on every
trial): heavy libraries load inside the functions.
"""

from compress.candidate import Timing, evaluate_variant, graph_signature, time_variant
from compress.export import ParityError, ParityReport, check_parity, export_onnx
from compress.registry import (apply_knobs, check_knob, check_settings, fine_tunes, knobs, untrained_settings,
                               variant_for, variant_names, variant_settings)
from compress.variants import Variant, VariantBuilder, build_variants, relative_loss

__all__ = [
    "ParityError", "ParityReport", "Timing", "Variant", "VariantBuilder", "apply_knobs", "build_variants",
    "check_knob", "check_parity", "check_settings", "compress_run", "evaluate_variant", "export_onnx",
    "fine_tunes", "graph_signature", "knobs", "relative_loss", "time_variant", "untrained_settings", "variant_for",
    "variant_names", "variant_settings",
]


def compress_run(*args, **kwargs):
    """Run the compress stage (see compress.stage.compress_run)."""
    from compress.stage import compress_run as run

    return run(*args, **kwargs)
