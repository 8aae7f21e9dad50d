"""A user's own task, loaded by reference ("tests.autoglm.tasks.user_task:LinearRegressionTask").

Noisy linear regression on synthetic data: small, but a real Task that trains through the shared loop.
"""

from __future__ import annotations

import numpy as np

from autoglm.tasks import IOSpec, Knob, Task, TensorSpec

TRUE_WEIGHTS = np.array([1.5, -2.0, 0.5, 3.0], dtype=np.float32)
TRUE_BIAS = 0.7
NOISE = 0.1


class LinearRegressionTask(Task):
    name = "linreg"
    metric = "mse"
    direction = "minimize"
    model_space = {"bias": Knob("categorical", True, choices=(True, False))}
    train_space = {"lr": Knob("float", 1e-2, low=1e-3, high=1e-1, log=True)}

    _splits = None

    def prepare(self):
        if self._splits is not None:
            return
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1200, 4)).astype(np.float32)
        y = (x @ TRUE_WEIGHTS + TRUE_BIAS + NOISE * rng.normal(size=1200)).astype(np.float32)
        self._splits = {"train": (x[:1000], y[:1000]), "val": (x[1000:1100], y[1000:1100]),
                        "test": (x[1100:], y[1100:])}

    def io_spec(self, model_args):
        return IOSpec(inputs=(TensorSpec("x", "float32", (4,)),), outputs=(TensorSpec("y", "float32", (1,)),))

    def batches(self, split, batch_size, n_batches, seed=0, model_args=None):
        self.prepare()
        x, y = self._splits[split]
        if split == "train":
            rng = np.random.default_rng(seed)
            for _ in range(n_batches):
                take = rng.integers(0, len(y), size=batch_size)
                yield {"x": x[take]}, y[take]
        else:
            for start in range(0, min(len(y), batch_size * n_batches), batch_size):
                yield {"x": x[start:start + batch_size]}, y[start:start + batch_size]

    def build_model(self, model_args):
        import torch

        args = self.check_model_args(model_args)
        torch.manual_seed(self.seed)
        model = torch.nn.Linear(4, 1, bias=args["bias"])
        model.model_args = args
        return model

    def loss(self, model, inputs, targets):
        from torch.nn import functional as F

        return F.mse_loss(model(inputs["x"])[:, 0], targets)

    def score(self, outputs, targets):
        return {"sse": float(((outputs[:, 0] - targets) ** 2).sum()), "count": float(len(targets))}

    def finish(self, totals):
        return {"mse": totals["sse"]}
