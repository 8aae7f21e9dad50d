"""Checkpoints that carry what made them: task name, model_args, weights, metrics.

Loading uses ``torch.load(weights_only=True)``, so a checkpoint can hold only tensors and plain data
(no pickled code runs); anything unreadable becomes a DataError that names the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoglm.artifacts import atomic_output
from autoglm.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from autoglm.tasks.base import Task

FORMAT = 1
REQUIRED_KEYS = ("task", "model_args", "state_dict")


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``build_model`` turns it back into a model."""

    task: str
    model_args: dict[str, Any]
    state_dict: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build_model(self, task: Task) -> torch.nn.Module:
        """The task's model from ``model_args`` with these weights, in eval mode."""
        where = self.path or "the checkpoint"
        if task.name != self.task:
            raise ConfigError(f"{where} was trained for task '{self.task}', not '{task.name}': "
                              f"set task.name={self.task} or use a checkpoint of task '{task.name}'")
        model = task.build_model(self.model_args)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise DataError(f"{where} does not fit the model its model_args build ({exc}); was it trained "
                            "on other data (a different vocabulary)? Use the same task.data as in training") from None
        model.model_args = dict(self.model_args)
        return model.eval()


def save_checkpoint(path: Path | str, task_name: str, model: torch.nn.Module,
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's weights and ``model.model_args`` atomically; returns ``path``."""
    import torch

    model_args = getattr(model, "model_args", None)
    if model_args is None:
        raise ConfigError("the model has no model_args attribute: build it with task.build_model(...) so the "
                          "checkpoint records how to rebuild it")
    payload = {
        "format": FORMAT,
        "task": task_name,
        "model_args": dict(model_args),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; DataError names the file if it is not one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist: train first (autoglm train) or fix the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"checkpoint {path} is unreadable or corrupt ({reason}): re-create it by training "
                        "again") from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise DataError(f"{path} is not an autoglm checkpoint (needs keys {list(REQUIRED_KEYS)}): pass a file "
                        "written by autoglm train")
    if payload.get("format") != FORMAT:
        raise DataError(f"checkpoint {path} has format {payload.get('format')!r}, this version reads {FORMAT}: "
                        "re-create it by training again")
    shapes = {"task": str, "model_args": dict, "state_dict": dict, "metrics": dict | type(None),
              "extra": dict | type(None)}
    wrong = [key for key, kind in shapes.items() if not isinstance(payload.get(key), kind)]
    if wrong:
        raise DataError(f"{path} is not an autoglm checkpoint ({', '.join(wrong)} of the wrong type): pass a file "
                        "written by autoglm train")
    return Checkpoint(task=payload["task"], model_args=dict(payload["model_args"]),
                      state_dict=payload["state_dict"], metrics=dict(payload.get("metrics") or {}),
                      extra=dict(payload.get("extra") or {}), path=path)
