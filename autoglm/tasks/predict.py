"""Predictors: the one shape every backend takes for evaluation -- named numpy inputs in, numpy out.

``Task.evaluate`` scores any predictor with the same code, so a torch model, an ONNX Runtime session
and (later) a Triton client are compared on identical batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoglm._lazy import require
from autoglm.device import CPU_EP, GPU_PROVIDERS, PROVIDER_PACKAGES, ProviderChoice
from autoglm.errors import ConfigError
from autoglm.tasks.base import Inputs, Predictor

if TYPE_CHECKING:
    import onnxruntime
    import torch


def torch_predictor(model: torch.nn.Module, input_names: Sequence[str] | None = None) -> Predictor:
    """Run ``model`` in eval mode under ``torch.inference_mode``; returns its first output as numpy.

    Inputs are passed positionally, in ``input_names`` order if given, else in the order of the dict
    (the order of the task's io_spec). The model's train/eval mode is restored after each call.
    """
    import torch

    device = next(model.parameters()).device

    def predict(inputs: Inputs) -> np.ndarray:
        names = list(input_names) if input_names is not None else list(inputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in names]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = model(*tensors)
        finally:
            model.train(was_training)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu().numpy()

    return predict


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """ORT options with every graph optimization on (it matters: NCHWc conv layouts, fusions)."""
    ort = require("onnxruntime", "cpu", "ONNX evaluation")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one small graph at a time: parallelism belongs inside ops
    return options


def onnx_session(path: Path | str, threads: int | None = None,
                 providers: Sequence[str] | ProviderChoice | None = None) -> onnxruntime.InferenceSession:
    """An InferenceSession for the model at ``path`` (CPU provider unless told otherwise).

    ``providers`` is a list of provider names or a :class:`autoglm.device.ProviderChoice` (names and their
    options: the GPU ordinal, TensorRT's precision). A session that silently left out a GPU provider it was
    given (ONNX Runtime only warns when CUDA's libraries fail to load) is a ConfigError naming the package.
    """
    ort = require("onnxruntime", "cpu", "ONNX evaluation")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX model {path} does not exist: export or compress the model first")
    if isinstance(providers, ProviderChoice):
        kwargs = providers.session_args()
    else:
        kwargs = {"providers": list(providers or [CPU_EP])}
    session = ort.InferenceSession(str(path), sess_options=session_options(threads), **kwargs)
    dropped = [p for p in kwargs["providers"] if p in GPU_PROVIDERS and p not in session.get_providers()]
    if dropped:
        raise ConfigError(f"ONNX Runtime could not start {', '.join(dropped)} for {path.name} (its libraries did "
                          f"not load; ONNX Runtime's log above says which): install "
                          f"{PROVIDER_PACKAGES[dropped[0]]}, or set compress.providers=['cpu']")
    return session


def onnx_predictor(path_or_session: Path | str | Any, threads: int | None = None,
                   providers: Sequence[str] | ProviderChoice | None = None) -> Predictor:
    """A predictor over an ONNX model file or an existing InferenceSession; feeds inputs by name."""
    if isinstance(path_or_session, (str, Path)):
        session = onnx_session(path_or_session, threads=threads, providers=providers)
    else:
        session = path_or_session
    input_names = [i.name for i in session.get_inputs()]
    output_name = session.get_outputs()[0].name

    def predict(inputs: Inputs) -> np.ndarray:
        missing = [name for name in input_names if name not in inputs]
        if missing:
            raise ConfigError(f"the ONNX model needs inputs {input_names} but got {sorted(inputs)}: "
                              f"missing {missing}; export it with the task's io_spec input names")
        feed = {name: np.ascontiguousarray(inputs[name]) for name in input_names}
        return session.run([output_name], feed)[0]

    return predict
