"""The operating-point sweep: serving configs applied to the live Triton, each measured under load.

Order: per model, per queue bound, per preferred batch sizes, per queue delay, then instance counts innermost (an
instance-count change alone is applied in place; batching changes reload the model), and every
client concurrency per config. Models the sweep had to load are unloaded afterwards and every touched
model gets its original config back, so the server is left as it was found.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoglm.errors import AutoGLMError
from loadtest.control import LiveModels, ModelControl, ServingConfig
from loadtest.energy_join import EnergySource
from loadtest.latency import Slo
from autoglm.config import SweepGrid
from loadtest.runner import LoadSpec, run_window


def sweep_models(task_info: dict[str, Any], variants: list[str], default: str) -> list[str]:
    """Triton model names for ``variants`` (task.json variant names, Triton names, or ['all'])."""
    models = task_info["models"]
    if not variants:
        return [default]
    if variants == ["all"]:
        return list(dict.fromkeys(models.values()))
    out = []
    for name in variants:
        if name in models:
            out.append(models[name])
        elif name in models.values():
            out.append(name)
        else:
            raise AutoGLMError(f"variant '{name}' is not in the repository: choose from {sorted(models)} "
                               f"(or 'all')")
    return list(dict.fromkeys(out))


def serving_configs(models: list[str], grid: SweepGrid) -> list[ServingConfig]:
    """Every serving config of the grid, in the order that needs the fewest model reloads."""
    return [ServingConfig(model, delay, tuple(pref) if pref is not None else None, instances, queue)
            for model, queue, pref, delay, instances in itertools.product(
                models, grid.max_queue_size, grid.preferred_batch_sizes, grid.max_queue_delay_us, grid.instances)]


def run_sweep(control: ModelControl, configs: list[ServingConfig], users: list[int], *, scenario: str, host: str,
              payloads: Path, out_dir: Path, window_s: float, warmup_s: float, slo: Slo, metrics_url: str | None,
              energy: EnergySource | None, progress: Callable[[dict[str, Any]], None] | None = None,
              api_key: str | None = None) -> list[dict[str, Any]]:
    """Measure every (config, users) pair; returns the joined windows, each with ``id``, ``config``
    and ``applied`` (what Triton reported after the change)."""
    live = LiveModels(control)
    points: list[dict[str, Any]] = []
    try:
        for cfg in configs:
            applied = live.apply(cfg)
            for n in users:
                point_id = f"p{len(points):02d}"
                spec = LoadSpec(scenario, host, cfg.model, users=n, duration_s=window_s, warmup_s=warmup_s, slo=slo,
                                api_key=api_key)
                result = run_window(spec, out_dir / point_id, payloads=payloads, metrics_url=metrics_url,
                                    triton_model=cfg.model, energy=energy)
                point = {"id": point_id, "config": cfg.to_dict(), "applied": applied, **result}
                points.append(point)
                if progress:
                    progress(point)
    except BaseException:
        with contextlib.suppress(AutoGLMError):  # the failure that stopped the sweep is the one to report
            live.restore()
        raise
    live.restore()
    return points
