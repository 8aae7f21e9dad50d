"""INT4 weight-only quantization with ONNX Runtime's ``MatMulNBits``: 4-bit weights in blocks, FP32 activations.

Decoding one token reads every weight once, so at batch 1 a decoder's speed is about memory bandwidth / bytes
of weights. INT4 stores each MatMul's constant weight (K, N) as 4-bit integers with one FP32 scale (and a 4-bit
zero point unless symmetric) per ``block_size`` rows of each column: about 1/7 of FP32's bytes at block 32.
Coarser blocks decode faster and round more coarsely: the KV-cache decode graphs start at ``block_size`` and,
where the loss gate rejects it, try each finer block down to :data:`FINEST_BLOCK` (:meth:`Int4Recipe.finer`).
Activations are not quantized ahead of time: ``accuracy_level`` 4 quantizes them to int8 at run time, per block
of each row, so a row's result never depends on the other rows of its batch (dynamic INT8's activation scale is
per tensor); 0 computes in FP32 from dequantized weights. Everything else (embeddings, norms, attention) stays
FP32. ONNX Runtime only: ``MatMulNBits`` is a contrib op of its CPU and CUDA providers (TensorRT has no kernel).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autoglm._lazy import require
from autoglm.artifacts import atomic_output
from autoglm.errors import ConfigError

__all__ = ["ACCURACY_LEVELS", "FINEST_BLOCK", "Int4Recipe", "quantizable_matmuls", "quantize_int4", "weight_bytes"]

# MatMulNBits' accuracy_level: the lowest precision its kernel may compute in (0 unset = FP32, 1 FP32, 2 FP16,
# 3 BF16, 4 INT8); a CPU without a kernel for a level falls back to FP32
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FINEST_BLOCK = 32  # the finest block a rejected coarser one falls back to: onnxruntime-genai's and llama.cpp's

log = logging.getLogger(__name__)


class NothingToQuantize(ConfigError):
    """The graph has no MatMul with a constant weight (besides a kept head): INT4 would change nothing."""


@dataclass(frozen=True)
class Int4Recipe:
    """How to quantize one graph to INT4 weights; impossible combinations are refused here, not inside ORT.

    ``keep_head``: leave the last quantizable MatMul (an LM's head, the widest one) in FP32."""

    block_size: int = 128
    symmetric: bool = False
    accuracy_level: int = 4
    keep_head: bool = False

    def __post_init__(self) -> None:
        b = self.block_size
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ConfigError(f"INT4 block_size={b!r}: MatMulNBits takes a power of two >= 16 (32, 64, 128)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"INT4 accuracy_level={self.accuracy_level!r} is unknown: use one of "
                              f"{list(ACCURACY_LEVELS)} (4: int8 compute, 0: FP32)")

    def finer(self) -> Int4Recipe | None:
        """This recipe with half the block (a finer grid, more scales), or None at :data:`FINEST_BLOCK` or below."""
        return replace(self, block_size=self.block_size // 2) if self.block_size > FINEST_BLOCK else None

    @classmethod
    def of(cls, settings: Any) -> Int4Recipe:
        """The recipe of a config section (compress.int4)."""
        return cls(settings.block_size, settings.symmetric, settings.accuracy_level, settings.keep_head)

    def to_dict(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "symmetric": self.symmetric, "accuracy_level": self.accuracy_level,
                "keep_head": self.keep_head}


def quantizable_matmuls(model: Any) -> list[Any]:
    """The MatMul nodes of ``model`` (an ``onnx.ModelProto``) whose weight input B is a constant 2-D initializer,
    in graph order: what MatMulNBits replaces (a MatMul of two activations, attention's, stays)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2]


def quantize_int4(src: Path | str, dst: Path | str, recipe: Int4Recipe | None = None) -> Path:
    """Quantize the MatMul weights of the ONNX model at ``src`` to INT4 (``MatMulNBits``) and write ``dst``
    atomically; :class:`NothingToQuantize` when the graph has none to quantize.

    A weight whose K is not a multiple of ``block_size`` is padded with zeros to whole blocks (K is kept as the
    node's attribute, so the result is exact in shape)."""
    onnx = require("onnx", purpose="INT4 quantization")
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "cpu", "INT4 quantization")
    recipe = recipe or Int4Recipe()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"ONNX model {src} does not exist: export the model before quantizing it")
    model = onnx.load(str(src))
    targets = quantizable_matmuls(model)
    for k, node in enumerate(targets):  # ORT excludes nodes by name; builders may leave them unnamed
        node.name = node.name or f"int4_matmul_{k}"
    if recipe.keep_head:
        targets = targets[:-1]
    if not targets:
        raise NothingToQuantize(f"{src} has no MatMul with a constant weight{' besides its head' * recipe.keep_head}: "
                          "INT4 would change nothing; drop the int4 variant for this model (int8 suits a CNN)")
    keep = {n.name for n in model.graph.node if n.op_type == "MatMul"} - {n.name for n in targets}
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=4, block_size=recipe.block_size, is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level or None, nodes_to_exclude=sorted(keep), op_types_to_quantize=("MatMul",))
    with _quiet():
        quantizer.process()
    out = quantizer.model.model
    with atomic_output(dst) as tmp:
        onnx.save(out, str(tmp))
    made = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    if made != len(targets):  # an "INT4" artifact with FP32 layers left inside would mislead every comparison
        dst.unlink()
        raise ConfigError(f"INT4 quantized {made} of the {len(targets)} MatMul weights of {src}: the others are "
                          "not 2-D constants MatMulNBits takes; use the int8 variant for this model")
    return dst


def weight_bytes(path: Path | str) -> int:
    """Bytes of the constant tensors (weights, scales, zero points) of the ONNX model at ``path``: its weights at
    rest. Decoding one token reads all of them but the embedding tables, of which it gathers a row."""
    onnx = require("onnx", purpose="INT4 quantization")
    model = onnx.load(str(path))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs every node it visits through the root logger: quiet while it runs."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
