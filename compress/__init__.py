"""compress: torch -> ONNX (parity-gated), INT8 (static QDQ, dynamic), structurally pruned, QAT and
TensorRT variants, and the Triton model repository.

Import cost is kept low (tune calls this on every trial): heavy libraries load inside the functions.
"""

from compress.export import ParityError, ParityReport, check_parity, export_onnx
from compress.variants import Variant, VariantBuilder, build_variants, relative_loss

__all__ = [
    "ParityError", "ParityReport", "Variant", "VariantBuilder", "build_variants", "check_parity", "export_onnx",
    "relative_loss", "compress_run", "knobs",
]


def compress_run(*args, **kwargs):
    """Run the compress stage (see compress.stage.compress_run)."""
    from compress.stage import compress_run as run

    return run(*args, **kwargs)


def knobs() -> dict[str, dict]:
    """Every compression pass's searchable knobs, by pass: what tune adds to its search space."""
    from compress.prune import KNOBS as PRUNE
    from compress.quantize import KNOBS as QUANTIZE

    return {"quantize": QUANTIZE, "prune": PRUNE}
