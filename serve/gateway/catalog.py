"""Which task the served models belong to: ``repository/task.json``, written by compress.

The task endpoints (``/v1/models/<name>:<verb>``) find their Triton model and their request
metadata (class labels, vocabulary or tokenizer, input and output names) here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from autoglm.errors import AutoGLMError
from autoglm.text_codec import TextCodec, is_language_model, is_text_classifier

# task endpoints per kind of task: :predict takes any task's tensors (KServe v1 instances); classify
# takes images (digits), text-classify texts (a Hugging Face sequence classifier)
VERBS = {"classify": ("predict",), "text-classify": ("predict",), "language-model": ("predict", "generate", "score"),
         "tensors": ("predict",)}


@dataclass(frozen=True)
class TaskCatalog:
    """``repository/task.json``: which task the models serve, their names, and request metadata."""

    task: str
    models: dict[str, str]  # variant -> Triton model name
    recommended: str
    metadata: dict
    io: dict
    generate: str | None = None  # the KV-cache generation model, where compress built one
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        meta = self.metadata
        kind = "text-classify" if is_text_classifier(meta) else "classify" if "classes" in meta else \
            "language-model" if is_language_model(meta) else "tensors"
        object.__setattr__(self, "kind", kind)

    @classmethod
    def load(cls, repository: Path | str) -> TaskCatalog:
        path = Path(repository) / "task.json"
        try:
            info = json.loads(path.read_text())
            return cls(info["task"], dict(info["models"]), info["recommended"], info.get("metadata", {}), info["io"],
                       info.get("generate"))
        except (OSError, ValueError, KeyError) as exc:
            raise AutoGLMError(f"{path} is missing or incomplete ({exc}): re-run `autoglm compress`") from None

    def resolve(self, name: str) -> str | None:
        """Triton model for a task-endpoint name: the task (→ recommended), a variant, or a model name."""
        if name == self.task:
            return self.recommended
        if name in self.models:
            return self.models[name]
        return name if name in self.models.values() or (name and name == self.generate) else None

    @functools.cached_property
    def codec(self) -> TextCodec:
        """Text <-> token ids for language models and text classifiers (built on first use: a tokenizer
        takes milliseconds to load)."""
        return TextCodec.from_metadata(self.metadata)

    @property
    def names(self) -> list[str]:
        return sorted({self.task, *self.models, *self.models.values(), *([self.generate] if self.generate else [])})
