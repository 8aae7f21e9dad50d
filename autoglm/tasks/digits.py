"""digits: a small CNN on scikit-learn's 8x8 handwritten digits (bundled, no download), scored by accuracy.

The 1,797 images are split 70/15/15, stratified, with a fixed split seed -- not the run seed -- so the
validation and test sets are the same in every run and metrics compare across runs and trials.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoglm.tasks.base import IOSpec, Knob, Task, TensorSpec

if TYPE_CHECKING:
    import torch

SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


class DigitsTask(Task):
    """Ten-class image classification; inputs are pixel intensities scaled to [0, 1]."""

    name = "digits"
    metric = "accuracy"
    direction = "maximize"
    other_metrics = {"loss": "minimize"}  # mean cross-entropy on the split
    reads_data = False  # scikit-learn's bundled images
    model_space = {
        "channels": Knob("int", 32, low=8, high=64, step=8, minimum=1, role="width"),
        "hidden": Knob("int", 64, low=32, high=256, minimum=1, role="width"),
        "dropout": Knob("float", 0.1, low=0.0, high=0.5, maximum=1.0),
    }
    train_space = {
        "lr": Knob("float", 3e-3, low=1e-4, high=1e-2, log=True),
        "weight_decay": Knob("float", 0.01, low=0.0, high=0.1),
        "batch_size": Knob("categorical", 64, choices=(32, 64, 128)),
        "warmup_frac": Knob("float", 0.05, low=0.0, high=0.2),
        "max_steps": Knob("int", 400, low=100, high=1000),
    }

    _splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def prepare(self) -> None:
        """Load the bundled images and split them once per task object (fast; nothing is written)."""
        if self._splits is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
        labels = digits.target.astype(np.int64)
        holdout = SPLIT_FRACTIONS["val"] + SPLIT_FRACTIONS["test"]
        x_train, x_rest, y_train, y_rest = train_test_split(
            images, labels, test_size=holdout, stratify=labels, random_state=SPLIT_SEED)
        x_val, x_test, y_val, y_test = train_test_split(
            x_rest, y_rest, test_size=SPLIT_FRACTIONS["test"] / holdout, stratify=y_rest, random_state=SPLIT_SEED)
        self._splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}

    def split_size(self, split: Literal["train", "val", "test"]) -> int:
        """Number of images in a split."""
        self.prepare()
        return len(self._splits[split][1])

    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        return IOSpec(inputs=(TensorSpec("image", "float32", (1, 8, 8)),),
                      outputs=(TensorSpec("logits", "float32", (10,)),))

    def serving_metadata(self, model_args: Mapping[str, Any]) -> dict[str, Any]:
        """Raw 8x8 images hold 0..16 per pixel; the model takes them divided by 16."""
        return {"pixel_max": 16.0, "classes": [str(c) for c in range(10)]}

    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """``train``: shuffled epochs drawn with ``seed`` (every image once per epoch); others: in order."""
        self.prepare()
        images, labels = self._splits[split]
        if split == "train":
            rng = np.random.default_rng(seed)
            order = np.empty(0, dtype=np.int64)
            for _ in range(n_batches):
                while len(order) < batch_size:
                    order = np.concatenate([order, rng.permutation(len(labels))])
                take, order = order[:batch_size], order[batch_size:]
                yield {"image": images[take]}, labels[take]
            return
        for start in range(0, min(len(labels), batch_size * n_batches), batch_size):
            yield {"image": images[start:start + batch_size]}, labels[start:start + batch_size]

    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        import torch

        from autoglm.tasks.models import DigitsCNN

        args = self.check_model_args(model_args)
        torch.manual_seed(self.seed)
        model = DigitsCNN(channels=args["channels"], hidden=args["hidden"], dropout=args["dropout"])
        model.model_args = args  # carried by the model, so training, evaluation and checkpoints know it
        return model

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        return F.cross_entropy(model(inputs["image"]), targets)

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        logits = outputs.astype(np.float64)  # (B, 10)
        top = logits.max(axis=1)
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll = log_norm - np.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
        correct = (outputs.argmax(axis=1) == targets).sum()
        return {"correct": float(correct), "loss": float(nll.sum()), "count": float(len(targets))}

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        return {"accuracy": totals["correct"], "loss": totals["loss"]}
