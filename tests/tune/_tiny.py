"""Settings for studies small enough to test: a fixed tiny digits model, only three knobs searched.

A trial then costs one to two CPU-seconds (the first one more: imports and ONNX Runtime warm-up).
"""

from __future__ import annotations

from pathlib import Path

from autoglm.config import Settings, load_settings

# searched: train.lr, quantize.mode, prune.ratio; everything that makes training slow is pinned
SPACE = ('{"model.channels" = 8, "model.hidden" = 32, "model.dropout" = 0.0, "train.max_steps" = 120, '
         '"train.batch_size" = 32, "train.warmup_frac" = 0.0, "train.weight_decay" = 0.0}')
CHARLM_SPACE = ('{"model.n_layer" = 1, "model.n_embd" = 32, "model.n_head" = 2, "model.block_size" = 16, '
                '"model.dropout" = 0.0, "model.bias" = false, "train.max_steps" = 20, "train.batch_size" = 8, '
                '"train.grad_accum" = 1}')
FAST = [
    "compress.exporter='legacy'", "compress.prune.finetune_steps=20",
    "compress.quantize.calibration_batches=2", "tune.probe_repeats=3", "measure.warmup=1",
    "train.eval_batches=3", "train.eval_every=20", "tune.serving_batch=8",
    "tune.early_stop.min_resource=20", "tune.early_stop.warmup_trials=2",
]


def overrides(root: Path, *extra: str, run: str = "t", space: str = SPACE) -> list[str]:
    """``--set`` values for a tiny study under ``root`` (runs and data cache both inside); digits by default."""
    return [f"run.root='{root / 'runs'}'", f"run.cache_dir='{root / 'cache'}'", f"run.name='{run}'",
            f"tune.space={space}", *FAST, *extra]


def settings(root: Path, *extra: str, run: str = "t") -> Settings:
    return load_settings(None, overrides(root, *extra, run=run))


def journal_study(tune_dir: Path, name: str = "autoglm"):
    """The study as another process sees it, loaded from the run's journal file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name,
                             storage=JournalStorage(JournalFileBackend(str(tune_dir / "study.journal"))))
