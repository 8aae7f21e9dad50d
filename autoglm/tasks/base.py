"""The Task contract: what every workload (built-in or user's own) tells the pipeline.

A task owns its data, its model family and its metric. Stages never look inside a model: they build it
from ``model_args``, train it with the shared loop, and evaluate a *predictor* -- any callable taking a
dict of numpy inputs and returning the primary output -- so torch, ONNX Runtime and a Triton client are
scored by the same code. Importing this module must not import torch (the gateway uses tasks too).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from autoglm.errors import ConfigError

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch

    from autoglm.config import TrainSettings
    from autoglm.tasks.decoder import DecoderWeights

Inputs = Mapping[str, np.ndarray]
Predictor = Callable[[Inputs], np.ndarray]
"""batch of named numpy inputs -> primary output (e.g. logits), batch axis first."""
EvalCallback = Callable[[int, float], bool]
"""(step, validation metric) -> True to stop training now (early stopping)."""


@dataclass(frozen=True)
class Knob:
    """One tunable setting with its search range; ``default`` is what an untuned run uses.

    ``low``..``high`` (or ``choices``) is only what tuning searches, and a config may go past it;
    ``minimum``..``maximum`` is what the setting can take at all (a layer of 0 channels cannot be built, a
    dropout above 1 is no probability). Without them an int or float must be >= 0, and an integer choice >= 1.

    ``when = (other, values)`` makes the knob conditional (define-by-run): a trial samples it only when the knob
    ``other`` of the same group (``train.optimizer`` for ``train.momentum``) took one of ``values``; empty
    ``values`` means whenever ``other`` is on (not 0, False or None). Otherwise the configured value applies.

    ``role`` says what a model knob sizes: ``"width"`` (channels, embedding width, hidden units) or ``"depth"``
    (layers). Tuning priors scale such knobs relative to the configured model (tune.portfolio); a knob without
    a role keeps its configured value there."""

    kind: Literal["int", "float", "categorical"]
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    when: tuple[str, tuple[Any, ...]] | None = None
    role: Literal["width", "depth"] | None = None

    def active(self, other: Any) -> bool:
        """Whether a trial whose ``when`` knob took ``other`` samples this knob."""
        if self.when is None:
            return True
        values = self.when[1]
        return other in values if values else other not in (0, False, None)

    def check(self, name: str, value: Any) -> None:
        """Raise ConfigError naming the allowed values if ``value`` is not one of them."""
        numeric_choices = self.choices and all(isinstance(c, int) and not isinstance(c, bool) for c in self.choices)
        if self.kind == "categorical" and numeric_choices:
            # the choices are a search range (e.g. widths), not the only valid sizes
            least = 1 if self.minimum is None else self.minimum
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
            allowed = ("a positive integer" if least == 1 else f"an integer >= {least:g}") + \
                f" (searched: {list(self.choices)})"
        elif self.kind == "categorical":
            ok = value in self.choices or (not self.choices and value is not None)
            allowed = f"one of {list(self.choices)}"
        else:
            number = int if self.kind == "int" else int | float
            least = 0 if self.minimum is None else self.minimum
            ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value) \
                and least <= value and (self.maximum is None or value <= self.maximum)
            allowed = f"{'an integer' if self.kind == 'int' else 'a number'} >= {least:g}" + (
                "" if self.maximum is None else f" and <= {self.maximum:g}")
        if not ok:
            raise ConfigError(f"{name}={value!r} is invalid: use {allowed}")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` excludes the batch axis; -1 marks a dynamic axis."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class IOSpec:
    """Model I/O; axis 0 of every tensor is the dynamic batch axis."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass
class TrainResult:
    """What one training run did and reached; ``history`` holds (step, metric) at each evaluation."""

    steps: int
    samples: int  # examples (digits) or tokens (charlm) consumed
    wall_s: float
    cpu_s: float
    metric: float
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False


class Task(ABC):
    """Base class of every task. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the metric tune optimizes, e.g. "accuracy" or "val_loss"
    direction: ClassVar[Literal["maximize", "minimize"]]
    # the other metrics evaluate() returns that tune may optimize instead (``tune.metric``), with their directions
    other_metrics: ClassVar[dict[str, Literal["maximize", "minimize"]]] = {}
    model_space: ClassVar[dict[str, Knob]]  # architecture knobs (what build_model takes)
    train_space: ClassVar[dict[str, Knob]]  # training knobs, named as TrainSettings fields
    reads_data: ClassVar[bool] = True  # False: the task brings its own data and refuses task.data
    reads_model_id: ClassVar[bool] = False  # True: the constructor takes task.model_id (a pretrained model)

    def __init__(self, data: str | None = None, cache_dir: Path | str = ".cache/autoglm", seed: int = 1337):
        if data is not None and not self.reads_data:
            raise ConfigError(f"task.data={data!r} is set, but task '{self.name}' brings its own data and reads no "
                              "file: unset task.data")
        self.data_source = data
        self.cache_dir = Path(cache_dir)
        self.seed = seed

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def check_model_args(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``overrides``; unknown or impossible values raise ConfigError."""
        unknown = sorted(set(overrides) - set(cls.model_space))
        if unknown:
            raise ConfigError(
                f"unknown model setting(s) {unknown} for task '{cls.name}': known are {sorted(cls.model_space)}"
            )
        args = {k: knob.default for k, knob in cls.model_space.items()} | dict(overrides)
        for key, value in args.items():
            cls.model_space[key].check(f"task.model.{key}", value)
        return args

    @classmethod
    def metric_directions(cls) -> dict[str, Literal["maximize", "minimize"]]:
        """Every metric tune may optimize on this task, with its direction; the task's own first."""
        return {cls.metric: cls.direction, **cls.other_metrics}

    def scored_by(self, metric: str | None) -> Task:
        """This task with ``metric`` as the one training reports and tune optimizes (None: the task's own).

        Sets the instance's ``metric`` and ``direction``, so the training loop's evaluations, early stopping and
        selection all read the same metric; unknown names raise ConfigError listing the task's choices."""
        if metric is None:
            return self
        known = self.metric_directions()
        if metric not in known:
            raise ConfigError(f"tune.metric={metric!r} is not a metric of task '{self.name}': use one of "
                              f"{sorted(known)}, or unset it for the task's own ({type(self).metric})")
        self.metric, self.direction = metric, known[metric]
        return self

    # ---- data ------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Make the data ready (download-free; cached under cache_dir). Idempotent."""

    @abstractmethod
    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        """Input and output tensors of the model built from ``model_args``."""

    @abstractmethod
    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Deterministic (inputs, targets) batches of a split; the same seed gives the same batches.

        ``train``: ``n_batches`` random batches drawn with ``seed``. ``val``/``test``: the split in a
        fixed order, at most ``n_batches`` batches. ``model_args`` matter where the input shape depends
        on the model (charlm's block_size); None means the task defaults.
        """

    def example_inputs(self, batch_size: int = 1, model_args: Mapping[str, Any] | None = None,
                       ) -> dict[str, np.ndarray]:
        """A real validation batch of inputs (for export, parity and timing)."""
        inputs, _ = next(self.batches("val", batch_size, 1, seed=self.seed, model_args=model_args))
        return inputs

    def calibration_inputs(self, n_batches: int, batch_size: int = 16,
                           model_args: Mapping[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
        """Training-split inputs for static INT8 calibration."""
        batches = self.batches("train", batch_size, n_batches, seed=self.seed + 1, model_args=model_args)
        return [x for x, _ in batches]

    # ---- model -----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        """A fresh, seeded model. ``model_args`` is what check_model_args returned."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Training loss of one batch (scalar tensor)."""

    @abstractmethod
    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Metric sums of one batch, as ``{name: sum}`` plus ``"count"``; evaluate() averages them."""

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        """Turn averaged sums into the reported metrics (e.g. add perplexity); default: as is."""
        return totals

    def serving_metadata(self, model_args: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-able facts a server needs to turn friendly requests into tensors (e.g. a vocabulary).

        compress publishes it in the model repository's ``task.json``, so serving never needs the data.
        """
        return {}

    def prunable_layers(self, model: torch.nn.Module) -> list[torch.nn.Module] | None:
        """Layers whose output channels structural pruning may remove; None: every layer but the output.

        Override where shapes are tied, e.g. a transformer's residual width: charlm prunes MLP width only.
        """
        return None

    def decoder_weights(self, model: torch.nn.Module) -> DecoderWeights | None:
        """The model as a GPT-style decoder, for KV-cache generation graphs; None: not a decoder.

        Language-model tasks whose model fits :class:`DecoderWeights` return it, and compress then
        builds prefill/step graphs and a generation model for Triton.
        """
        return None

    # ---- training and evaluation (shared; override only for unusual tasks) -------------------------
    @contextmanager
    def training(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """What the task puts on ``model`` while it trains, taken off after (LoRA adapters, merged back); every
        trainer runs inside it: :meth:`train` and each DDP rank (:mod:`autoglm.ddp`). Default: nothing."""
        yield model

    def train(self, model: torch.nn.Module, settings: TrainSettings, on_eval: EvalCallback | None = None,
              log_path: Path | None = None, progress: bool = False) -> TrainResult:
        """Train with the shared loop (autoglm.tasks.training.fit), inside :meth:`training`."""
        from autoglm.tasks.training import fit

        with self.training(model):
            return fit(self, model, settings, on_eval=on_eval, log_path=log_path, progress=progress)

    def evaluate(self, predict: Predictor, split: Literal["train", "val", "test"] = "val",
                 n_batches: int = 20, batch_size: int = 64,
                 model_args: Mapping[str, Any] | None = None) -> dict[str, float]:
        """The task's metrics for any predictor, on the same fixed batches every time."""
        sums: dict[str, float] = {}
        for inputs, targets in self.batches(split, batch_size, n_batches, seed=0, model_args=model_args):
            for key, value in self.score(np.asarray(predict(inputs)), targets).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        count = sums.pop("count", 0.0)
        if count <= 0:
            raise ConfigError(f"task '{self.name}' produced no '{split}' examples to evaluate")
        return self.finish({k: v / count for k, v in sums.items()})
