"""Build, evaluate and time the compressed variants of one trained model.

The stage builds through here, and so does every tuning trial (through :mod:`compress.candidate`): each variant
builds through the pass registry (:mod:`compress.registry`) into an ONNX model (or a TensorRT plan) on disk, scored
with the task's own metric on validation data and timed at batch 1 and at a serving batch with
:func:`autoglm.measure.profile` (energy per inference with its method). FP32 exports (plain and pruned) must pass
the elementwise parity gate; INT8 variants are judged by the metric instead, against ``compress.max_metric_loss``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoglm.config import Settings
from autoglm.tasks import Predictor, Task
from compress.export import ParityReport, check_parity, export_onnx, require_parity, simplify_onnx
from compress.registry import passes, variant_spec

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
    """Makes the requested variants of ``model`` under ``out_dir``, re-using intermediate results.

    Each variant builds through the pass registry (:mod:`compress.registry`); the passes share the FP32 exports,
    the calibration batches and whatever :meth:`memo` keeps (the pruned model of pruned and pruned-int8)."""

    def __init__(self, task: Task, model, model_args: dict[str, Any], settings: Settings, out_dir: Path):
        self.task, self.model, self.model_args = task, model, model_args
        self.settings, self.cfg, self.out = settings, settings.compress, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.parity: list[ParityReport] = []
        self.exports: dict[str, Path] = {}  # FP32 graphs made by this builder (never stale files)
        self.nodes: dict[str, tuple[int, int]] = {}  # graph nodes before/after simplification
        self._memo: dict[str, Any] = {}

    # ---- what the passes share -------------------------------------------------------------------
    def export(self, model, name: str) -> Path:
        """``model`` as the parity-checked FP32 graph ``<name>.onnx`` (exported once per name)."""
        if name in self.exports:
            return self.exports[name]
        path = self.out / f"{name}.onnx"
        exporter = export_onnx(model, self.task, self.model_args, path, exporter=self.cfg.exporter)
        if self.cfg.simplify:
            self.nodes[name] = simplify_onnx(path)
        self.parity.append(check_parity(self.task, model, path, self.model_args, variant=name, exporter=exporter,
                                        atol=self.cfg.parity_atol, rtol=self.cfg.parity_rtol))
        self.exports[name] = path
        return path

    def fp32(self) -> Path:
        """The model's own FP32 export."""
        return self.export(self.model, "fp32")

    def calibration(self):
        """compress.quantize.calibration_batches batches of training inputs; None when that is 0."""
        n = self.cfg.quantize.calibration_batches
        return self.task.calibration_inputs(n, 16, model_args=self.model_args) if n else None

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per builder: what several variants start from."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def build(self, name: str) -> Variant:
        """Build one variant by name (see :func:`compress.registry.variant_names`); skipped, with the reason,
        where a pass it applies cannot run on this host or cannot transform this model."""
        spec = variant_spec(name)
        self.fp32()  # first, whatever the variant: most start from it, and its parity gate runs before them
        for pass_name in spec.passes:
            ok, reason = passes()[pass_name].available()
            if ok:
                ok, reason = self.memo(f"applies:{pass_name}", lambda p=pass_name: self._applies(p))
            if not ok:
                return Variant(name, None, {"pass": pass_name}, status="skipped", reason=reason)
        return spec.build(self, name)

    def _applies(self, pass_name: str) -> tuple[bool, str]:
        """Whether pass ``pass_name`` can transform this model; the reason is logged once per builder, however
        many variants apply the pass."""
        ok, reason = passes()[pass_name].applies(self.task, self.model)
        if not ok:
            log.warning("%s variants skipped: %s", pass_name, reason)
        return ok, reason

    # ---- evaluation --------------------------------------------------------------------------------
    @property
    def providers(self):
        """compress.providers for models served on serve.device (:func:`autoglm.device.settings_providers`)."""
        from autoglm.device import settings_providers

        return self.memo("providers", lambda: settings_providers(self.settings))

    @property
    def calibration_providers(self) -> list[str]:
        """Static INT8 calibrates on run.device: the CUDA provider where the run trains on a GPU and ONNX Runtime
        has it (the ranges are the same; the CPU is only slower), else the CPU provider."""
        from autoglm.device import CPU_EP, CUDA_EP, available_providers, resolve_device

        if resolve_device(self.settings.run.device).is_cuda and CUDA_EP in available_providers():
            return [CUDA_EP, CPU_EP]
        return [CPU_EP]

    def predictor(self, variant: Variant, threads: int | None = None) -> Predictor:
        """Run ``variant`` on the serving device's providers; ``threads`` defaults to run.threads (None: ONNX
        Runtime's own choice)."""
        from autoglm.tasks.predict import onnx_predictor

        if variant.path and variant.path.suffix == ".plan":
            from compress.tensorrt import engine_predictor

            return engine_predictor(variant.path, self.task.io_spec(self.model_args))
        return onnx_predictor(variant.path, threads=threads or self.settings.run.threads, providers=self.providers)

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
        # ONNX variants run on compress.providers' device; TensorRT plans on the GPU; torch where the model is
        if variant.path is None:
            device = str(next(self.model.parameters()).device)
        else:
            device = self.providers.device if self.providers.uses_gpu else "cpu"
            if variant.path.suffix == ".plan" and device == "cpu":
                device = "cuda"
        variant.profile = profile(predict, inputs, measure, threads=self.settings.run.threads, device=device)
        if variant.path is not None and variant.path.suffix == ".onnx":  # how it was timed, fallback included
            for row in variant.profile.values():
                row |= {"providers": list(self.providers.providers), "providers_fallback": self.providers.fallback}
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
        if variant.path in builder.exports.values():  # an FP32 export is served as is: gated before it is timed
            require_parity(builder.parity, out_dir / "parity.json")
        if variant.status != "skipped":
            builder.measure(variant, builder.predictor(variant), baseline)
        log.info("variant %s: %s %s", name, variant.status, variant.reason)
        variants.append(variant)
        if on_variant:
            on_variant(variant)
    require_parity(builder.parity, out_dir / "parity.json")
    return variants
