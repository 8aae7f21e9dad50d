"""Tabular tasks of the benchmark pool: an MLP on scikit-learn's bundled datasets, written as a user would write
a task, through the public :class:`autoglm.tasks.Task` API only (named ``"bench.pool.tabular:<Class>"``).

Features are standardized with the training split's mean and deviation; a regression target too, so its metric
(mean squared error on standardized targets, 1.0 = predicting the mean) reads the same on every dataset. The
rows are split 70/15/15 (stratified for a classification) with a fixed split seed, not the run seed, so every
trial and seed is scored on the same validation rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from autoglm.tasks import IOSpec, Knob, Task, TensorSpec

if TYPE_CHECKING:
    import torch

SPLIT_SEED = 0


class TabularTask(Task):
    """An MLP on one bundled table; subclasses name the dataset (:meth:`load`) and whether it classifies."""

    reads_data = False  # the table ships with scikit-learn
    classes: ClassVar[int] = 0  # 0: regression
    dataset: ClassVar[str]  # the scikit-learn loader of the bundled table
    model_space = {
        "hidden": Knob("int", 64, low=16, high=256, log=True, minimum=1, role="width"),
        "layers": Knob("int", 2, low=1, high=4, minimum=1, role="depth"),
        "dropout": Knob("float", 0.1, low=0.0, high=0.5, maximum=1.0),
    }
    train_space = {
        "lr": Knob("float", 3e-3, low=1e-4, high=3e-2, log=True),
        "weight_decay": Knob("float", 0.01, low=0.0, high=0.1),
        "batch_size": Knob("categorical", 32, choices=(16, 32, 64, 128)),
        "warmup_frac": Knob("float", 0.05, low=0.0, high=0.2),
        "max_steps": Knob("int", 300, low=50, high=1000),
    }
    _splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(features, targets) of the whole table."""
        from sklearn import datasets

        return getattr(datasets, self.dataset)(return_X_y=True)

    def prepare(self) -> None:
        """Load, split and standardize the table once per task object (fast; nothing is written)."""
        if self._splits is not None:
            return
        from sklearn.model_selection import train_test_split

        x, y = self.load()
        x = x.astype(np.float32)
        y = y.astype(np.int64) if self.classes else y.astype(np.float32)
        stratify = y if self.classes else None
        x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, stratify=stratify,
                                                            random_state=SPLIT_SEED)
        x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5,
                                                        stratify=y_rest if self.classes else None,
                                                        random_state=SPLIT_SEED)
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
        y_mean, y_std = (0.0, 1.0) if self.classes else (y_train.mean(), y_train.std() + 1e-6)
        self._splits = {name: ((xs - mean) / std, ys if self.classes else ((ys - y_mean) / y_std).astype(np.float32))
                        for name, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val),
                                             ("test", x_test, y_test))}

    @property
    def n_features(self) -> int:
        self.prepare()
        return self._splits["train"][0].shape[1]

    def io_spec(self, model_args: Mapping[str, Any]) -> IOSpec:
        return IOSpec(inputs=(TensorSpec("x", "float32", (self.n_features,)),),
                      outputs=(TensorSpec("y", "float32", (self.classes or 1,)),))

    def batches(self, split: Literal["train", "val", "test"], batch_size: int, n_batches: int,
                seed: int = 0, model_args: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """``train``: shuffled epochs drawn with ``seed``; others: the split in order."""
        self.prepare()
        xs, ys = self._splits[split]
        if split == "train":
            rng = np.random.default_rng(seed)
            order = np.empty(0, dtype=np.int64)
            for _ in range(n_batches):
                while len(order) < batch_size:
                    order = np.concatenate([order, rng.permutation(len(ys))])
                take, order = order[:batch_size], order[batch_size:]
                yield {"x": xs[take]}, ys[take]
            return
        for start in range(0, min(len(ys), batch_size * n_batches), batch_size):
            yield {"x": xs[start:start + batch_size]}, ys[start:start + batch_size]

    def build_model(self, model_args: Mapping[str, Any]) -> torch.nn.Module:
        import torch
        from torch import nn

        args = self.check_model_args(model_args)
        torch.manual_seed(self.seed)
        layers, width = [], self.n_features
        for _ in range(args["layers"]):
            layers += [nn.Linear(width, args["hidden"]), nn.ReLU(), nn.Dropout(args["dropout"])]
            width = args["hidden"]
        model = nn.Sequential(*layers, nn.Linear(width, self.classes or 1))
        model.model_args = args  # carried by the model, so training, evaluation and checkpoints know it
        return model

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        out = model(inputs["x"])
        return F.cross_entropy(out, targets) if self.classes else F.mse_loss(out[:, 0], targets)

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        if self.classes:
            return {"correct": float((outputs.argmax(axis=1) == targets).sum()), "count": float(len(targets))}
        return {"se": float(((outputs[:, 0].astype(np.float64) - targets) ** 2).sum()), "count": float(len(targets))}

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        return {"accuracy": totals["correct"]} if self.classes else {"mse": totals["se"]}


class _Classification(TabularTask):
    metric = "accuracy"
    direction = "maximize"


class _Regression(TabularTask):
    metric = "mse"  # on standardized targets: 1.0 is the training mean's error
    direction = "minimize"


class BreastCancerTask(_Classification):
    """Wisconsin breast cancer: 569 rows, 30 features, 2 classes."""

    name, classes, dataset = "breast-cancer", 2, "load_breast_cancer"


class WineTask(_Classification):
    """Wine cultivars: 178 rows, 13 features, 3 classes."""

    name, classes, dataset = "wine", 3, "load_wine"


class DiabetesTask(_Regression):
    """Diabetes progression: 442 rows, 10 features, a continuous target."""

    name, dataset = "diabetes", "load_diabetes"


class Friedman1Task(_Regression):
    """Friedman #1 (scikit-learn's generator, fixed seed): 1,000 rows, 10 features (5 of them noise), a smooth
    non-linear target with noise."""

    name, dataset = "friedman1", "make_friedman1"

    def load(self):
        from sklearn.datasets import make_friedman1

        return make_friedman1(n_samples=1000, n_features=10, noise=1.0, random_state=SPLIT_SEED)


class NoisyLinearTask(_Regression):
    """A small noisy regression (scikit-learn's ``make_regression``, fixed seed): 400 rows, 10 features (6 of
    them informative), a linear target under noise as large as its signal, where a long schedule overfits."""

    name, dataset = "noisy-linear", "make_regression"

    def load(self):
        from sklearn.datasets import make_regression

        return make_regression(n_samples=400, n_features=10, n_informative=6, noise=60.0, random_state=SPLIT_SEED)


class SyntheticClassificationTask(_Classification):
    """A small classification (scikit-learn's ``make_classification``, fixed seed): 500 rows, 20 features (5
    informative), 2 classes, 5% of the labels flipped."""

    name, classes, dataset = "synthetic-classification", 2, "make_classification"

    def load(self):
        from sklearn.datasets import make_classification

        return make_classification(n_samples=500, n_features=20, n_informative=5, flip_y=0.05,
                                   random_state=SPLIT_SEED)
