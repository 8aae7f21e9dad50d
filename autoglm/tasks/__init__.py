"""Tasks: the workloads the pipeline tunes, compresses and serves.

Built-in: ``digits`` (CNN on scikit-learn's digits, accuracy), ``charlm`` (GPT-style character LM on
Shakespeare, validation loss), and two that fine-tune a pretrained Hugging Face model named by
``task.model_id``: ``hf-causal-lm`` (a text file, validation loss) and ``hf-sequence-classification`` (a CSV or
JSONL of text and label, accuracy). Your own task is any :class:`Task` subclass, named as ``"module:attr"``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from autoglm.errors import ConfigError
from autoglm.tasks.base import EvalCallback, Inputs, IOSpec, Knob, Predictor, Task, TensorSpec, TrainResult
from autoglm.tasks.decoder import DecoderLayer, DecoderWeights

if TYPE_CHECKING:
    from autoglm.config import Settings

__all__ = [
    "DecoderLayer", "DecoderWeights", "EvalCallback", "IOSpec", "Inputs", "Knob", "Predictor", "Task", "TensorSpec",
    "TrainResult",
    "BUILTIN", "get_task", "task_class",
]

# name -> "module:attr"; modules are imported only when a task is asked for
BUILTIN = {
    "digits": "autoglm.tasks.digits:DigitsTask",
    "charlm": "autoglm.tasks.charlm:CharLMTask",
    "hf-causal-lm": "autoglm.tasks.hf_causal_lm:HFCausalLMTask",
    "hf-sequence-classification": "autoglm.tasks.hf_classifier:HFClassifierTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class for a built-in name or a ``"package.module:ClassName"`` reference."""
    ref = BUILTIN.get(name, name)
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown task '{name}': use one of {sorted(BUILTIN)} or 'package.module:TaskClass' for your own"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ConfigError(f"task '{name}': cannot import module '{module_name}' ({exc}); is it on PYTHONPATH?") from exc
    except AttributeError:
        raise ConfigError(f"task '{name}': module '{module_name}' has no attribute '{attr}'") from None
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise ConfigError(f"task '{name}' is {obj!r}, not a subclass of autoglm.tasks.Task")
    return obj


def get_task(settings: Settings) -> Task:
    """Instantiate the configured task with its data source, cache and seed.

    ``task.name`` and ``task.model`` are checked here, where every stage resolves its task: the config
    knows no task (the core imports none), so an unknown task or model setting raises ConfigError now."""
    cls = task_class(settings.task.name)
    cls.check_model_args(settings.task.model)
    extra = {}
    if cls.reads_model_id:
        extra["model_id"] = settings.task.model_id
    elif settings.task.model_id is not None:
        raise ConfigError(f"task.model_id={settings.task.model_id!r} is set, but task '{cls.name}' builds its own "
                          "model: unset task.model_id, or use task.name='hf-causal-lm' or "
                          "'hf-sequence-classification'")
    return cls(data=settings.task.data, cache_dir=settings.run.cache_dir, seed=settings.run.seed, **extra)
