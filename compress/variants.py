"""Build, evaluate and time the compressed variants of one trained model.

This is compress's public entry point for both the stage and every tuning trial: each variant is an
ONNX model (or a TensorRT plan) on disk, scored with the task's own metric on validation data and timed
at batch 1 and at a serving batch with :func:`autoglm.measure.profile` (energy per inference with its
method). FP32 exports (plain and pruned) must pass the elementwise parity gate; INT8 variants are judged
by the metric instead, against ``compress.max_metric_loss``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoglm.config import Settings
from autoglm.tasks import Predictor, Task
from compress.export import ParityReport, check_parity, export_onnx, require_parity, simplify_onnx

log = logging.getLogger(__name__)
Status = Literal["ok", "rejected", "skipped", "reference"]


@dataclass
class Variant:
    """One compressed model and what it measured."""

    name: str
    path: Path | None
    recipe: dict[str, Any] = field(default_factory=dict)
    status: Status = "ok"
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    metric_loss: float | None = None  # relative loss vs the torch FP32 model; positive = worse
    profile: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path and self.path.is_file() else 0

    def to_dict(self, root: Path | None = None) -> dict[str, Any]:
        path = str(self.path.relative_to(root) if root and self.path else self.path) if self.path else None
        return {"name": self.name, "path": path, "recipe": self.recipe, "status": self.status,
                "reason": self.reason, "metrics": self.metrics, "metric_loss": self.metric_loss,
                "size_bytes": self.size_bytes, "profile": {str(b): p for b, p in self.profile.items()}}


def relative_loss(task: Task, value: float, baseline: float) -> float:
    """How much worse ``value`` is than ``baseline``, relative (negative = better)."""
    worse = baseline - value if task.direction == "maximize" else value - baseline
    return worse / max(abs(baseline), 1e-12)


class VariantBuilder:
    """Makes the requested variants of ``model`` under ``out_dir``, re-using intermediate results."""

    def __init__(self, task: Task, model, model_args: dict[str, Any], settings: Settings, out_dir: Path):
        self.task, self.model, self.model_args = task, model, model_args
        self.settings, self.cfg, self.out = settings, settings.compress, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parity: list[ParityReport] = []
        self._pruned_model = None
        self._exported: dict[str, Path] = {}  # FP32 graphs made by this builder (never stale files)
        self.nodes: dict[str, tuple[int, int]] = {}  # graph nodes before/after simplification

    # ---- the passes ------------------------------------------------------------------------------
    def _export(self, model, name: str) -> Path:
        if name in self._exported:
            return self._exported[name]
        path = self.out / f"{name}.onnx"
        exporter = export_onnx(model, self.task, self.model_args, path, exporter=self.cfg.exporter)
        if self.cfg.simplify:
            self.nodes[name] = simplify_onnx(path)
        self.parity.append(check_parity(self.task, model, path, self.model_args, variant=name, exporter=exporter,
                                        atol=self.cfg.parity_atol, rtol=self.cfg.parity_rtol))
        self._exported[name] = path
        return path

    def _calibration(self):
        n = self.cfg.quantize.calibration_batches
        return self.task.calibration_inputs(n, 16, model_args=self.model_args) if n else None

    def _quantize(self, src: Path, name: str, mode: str | None) -> Variant:
        from compress.quantize import PRESETS, choose_preset, cpu_has_vnni, quantize, recipe_for

        q = self.cfg.quantize
        mode = mode or (None if q.mode == "auto" else q.mode)
        if mode is None and q.preset:
            recipe = PRESETS[q.preset]
        else:
            mode = mode or PRESETS[choose_preset(src)].mode
            recipe = recipe_for(src, mode, q.calibration, q.per_channel)
        dst = quantize(src, self.out / f"{name}.onnx", recipe,
                       self._calibration() if recipe.mode == "static" else None)
        # record what this machine decided: reduce_range None means "on unless the CPU has VNNI"
        reduce_range = (not cpu_has_vnni()) if recipe.reduce_range is None else recipe.reduce_range
        return Variant(name, dst, {"pass": "quantize", "recipe": recipe.name, "mode": recipe.mode,
                                   "calibration": recipe.calibration, "per_channel": recipe.per_channel,
                                   "op_types": recipe.op_types, "reduce_range": reduce_range, "why": recipe.why})

    def _pruned(self):
        if self._pruned_model is None:
            from compress.prune import count_params, prune_and_finetune

            p = self.cfg.prune
            model, result = prune_and_finetune(copy.deepcopy(self.model), self.task, self.model_args, p.ratio,
                                               self.settings.train, p.finetune_steps, lr_frac=p.finetune_lr_frac)
            self._pruned_model = model
            self._prune_recipe = {"pass": "prune", "ratio": p.ratio, "finetune_steps": p.finetune_steps,
                                  "params_before": count_params(self.model), "params_after": count_params(model),
                                  "finetune_wall_s": result.wall_s}
        return self._pruned_model

    def build(self, name: str) -> Variant:
        """Build one variant by name (see autoglm.config.VARIANTS)."""
        if name == "fp32":
            path = self._export(self.model, "fp32")
            return Variant("fp32", path, {"pass": "export", "exporter": self.cfg.exporter,
                                          "nodes": self.nodes.get("fp32")})
        fp32 = self._export(self.model, "fp32")
        if name in ("int8", "int8-dynamic", "int8-static"):
            return self._quantize(fp32, name, {"int8": None}.get(name, name.removeprefix("int8-")))
        if name == "pruned":
            return Variant("pruned", self._export(self._pruned(), "pruned"), self._prune_recipe)
        if name == "pruned-int8":
            variant = self._quantize(self._export(self._pruned(), "pruned"), "pruned-int8", None)
            variant.recipe = {**self._prune_recipe, "then": variant.recipe}
            return variant
        if name == "qat":
            from compress.qat import qat

            q = self.cfg.qat
            path = qat(self.model, self.task, self.model_args, self.settings.train, q.steps, self.out / "qat.onnx",
                       calibration_batches=max(self.cfg.quantize.calibration_batches, 1), lr_frac=q.lr_frac)
            return Variant("qat", path, {"pass": "qat", "steps": q.steps, "lr_frac": q.lr_frac})
        if name in ("trt-fp16", "trt-int8"):
            return self._tensorrt(name)
        raise ValueError(f"unknown variant {name!r}")

    def _tensorrt(self, name: str) -> Variant:
        from compress.tensorrt import build_engine, tensorrt_status

        ok, reason = tensorrt_status()
        if not ok:
            return Variant(name, None, {"pass": "tensorrt"}, status="skipped", reason=reason)
        precision = name.removeprefix("trt-")
        fp32 = self._export(self.model, "fp32")
        # INT8 engines come from the static QDQ graph: explicit quantization, no TensorRT calibrator
        src = fp32 if precision == "fp16" else self._quantize(fp32, "int8-static", "static").path
        plan = build_engine(src, self.out / f"{name}.plan", self.task.io_spec(self.model_args), precision,
                            max_batch=self.cfg.triton.max_batch_size)
        return Variant(name, plan, {"pass": "tensorrt", "precision": precision, "source": src.name})

    # ---- evaluation --------------------------------------------------------------------------------
    def predictor(self, variant: Variant, threads: int | None = None) -> Predictor:
        """Run ``variant``; ``threads`` defaults to run.threads (None: ONNX Runtime's own choice)."""
        from autoglm.tasks.predict import onnx_predictor

        if variant.path and variant.path.suffix == ".plan":
            from compress.tensorrt import engine_predictor

            return engine_predictor(variant.path, self.task.io_spec(self.model_args))
        return onnx_predictor(variant.path, threads=threads or self.settings.run.threads)

    def measure(self, variant: Variant, predict: Predictor, baseline: float | None) -> Variant:
        """Score on validation data, then time; returns ``variant`` filled in."""
        self.score(variant, predict, baseline)
        return self.time(variant, predict)

    def score(self, variant: Variant, predict: Predictor, baseline: float | None) -> Variant:
        """The task metric on validation data; rejected when it loses more than compress.max_metric_loss."""
        n_batches = self.settings.train.eval_batches
        variant.metrics = self.task.evaluate(predict, "val", n_batches=n_batches, model_args=self.model_args)
        value = variant.metrics[self.task.metric]
        if baseline is not None:
            variant.metric_loss = relative_loss(self.task, value, baseline)
            if variant.status == "ok" and not variant.metric_loss <= self.cfg.max_metric_loss:  # NaN fails too
                variant.status = "rejected"
                variant.reason = (f"{self.task.metric} {value:.4f} is {variant.metric_loss:.2%} worse than FP32 "
                                  f"torch's {baseline:.4f} (limit compress.max_metric_loss="
                                  f"{self.cfg.max_metric_loss:g})")
        return variant

    def time(self, variant: Variant, predict: Predictor, batch_sizes: Sequence[int] | None = None,
             repeats: int | None = None) -> Variant:
        """Latency and energy per inference at each batch size (real validation inputs)."""
        from autoglm.measure import profile

        measure = self.settings.measure
        if repeats is not None:
            measure = measure.model_copy(update={"repeats": repeats, "warmup": min(measure.warmup, repeats)})
        inputs = {b: self.task.example_inputs(b, model_args=self.model_args)
                  for b in (batch_sizes or measure.batch_sizes)}
        device = "cuda" if variant.path is not None and variant.path.suffix == ".plan" else "cpu"  # TensorRT: GPU
        variant.profile = profile(predict, inputs, measure, threads=self.settings.run.threads, device=device)
        return variant


def build_variants(task: Task, model, model_args: dict[str, Any], settings: Settings, out_dir: Path,
                   names: Sequence[str] | None = None,
                   on_variant: Callable[[Variant], None] | None = None) -> list[Variant]:
    """Build, parity-check, evaluate and time each requested variant; the first row is torch FP32.

    Writes ``parity.json`` in ``out_dir`` and raises ParityError if an FP32 export fails the gate.
    """
    from autoglm.tasks.predict import torch_predictor

    names = list(dict.fromkeys(["fp32", *(names or settings.compress.variants)]))
    builder = VariantBuilder(task, model, model_args, settings, out_dir)
    reference = builder.measure(Variant("torch", None, {"pass": "none"}, status="reference"),
                                torch_predictor(model), None)
    baseline = reference.metrics[task.metric]
    variants = [reference]
    for name in names:
        variant = builder.build(name)
        if name == "fp32" or name == "pruned":
            require_parity(builder.parity, out_dir / "parity.json")
        if variant.status != "skipped":
            builder.measure(variant, builder.predictor(variant), baseline)
        log.info("variant %s: %s %s", name, variant.status, variant.reason)
        variants.append(variant)
        if on_variant:
            on_variant(variant)
    require_parity(builder.parity, out_dir / "parity.json")
    return variants
