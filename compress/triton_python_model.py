"""Triton python-backend model: serves ``model.onnx`` with one ONNX Runtime session per instance.

This file is copied verbatim into the model repository as ``<model>/<version>/model.py`` and runs
inside Triton's python-backend stub, so it imports only what that environment has: the backend's
``triton_python_backend_utils``, numpy, json, os and onnxruntime -- never the project.

Config parameters it reads (all optional): ``intra_op_threads`` and ``inter_op_threads`` (0 lets ONNX
Runtime choose; with several instances on few cores, give each instance cores / instances); ``providers``
(ONNX Runtime execution providers in priority order, comma-separated; default the CPU's) and
``tensorrt_fp16`` ("true": TensorRT may pick FP16 kernels). On a KIND_GPU instance the CUDA and TensorRT
providers run on the instance's own GPU. A provider this environment's onnxruntime lacks fails the load
with the package to install, never a quiet fallback to the CPU.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


GPU_PROVIDERS = {"TensorrtExecutionProvider": "onnxruntime-gpu and tensorrt",
                 "CUDAExecutionProvider": "onnxruntime-gpu (in place of onnxruntime)"}


def _providers(params, args):
    """(providers, their options) from the config's parameters, on the instance's GPU where it has one."""
    providers = [p.strip() for p in params.get("providers", "").split(",") if p.strip()] or ["CPUExecutionProvider"]
    if any(p in GPU_PROVIDERS for p in providers) and hasattr(ort, "preload_dlls"):
        # the stub never imports torch, whose import loads CUDA's and cuDNN's libraries for ONNX Runtime
        # elsewhere: load them from the environment's nvidia-* packages instead (ONNX Runtime >= 1.21)
        ort.preload_dlls()
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(f"providers {missing} are not in this environment's onnxruntime "
                         f"({ort.get_available_providers()}): install "
                         f"{', '.join(GPU_PROVIDERS.get(p, p) for p in missing)}, or render the repository "
                         f"for the CPU (serve.device='cpu')")
    on_gpu = args.get("model_instance_kind") == "GPU"
    device_id = str(args.get("model_instance_device_id", 0)) if on_gpu else "0"
    fp16 = "True" if params.get("tensorrt_fp16", "").lower() == "true" else "False"
    options = {"CUDAExecutionProvider": {"device_id": device_id},
               "TensorrtExecutionProvider": {"device_id": device_id, "trt_fp16_enable": fp16}}
    return providers, [options.get(p, {}) for p in providers]


def _error(message, code_name):
    """A TritonError with a status code where this backend version supports codes."""
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """``initialize`` once per instance, ``execute`` once per (dynamic) batch, ``finalize`` on unload."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", args.get("model_name", "model"))
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"]), [int(d) for d in t["dims"]])
                       for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_threads") or 0)
        # Full graph optimization (layout transforms, fusions) is worth up to 3x on CPU, paid once here.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_dir = os.path.join(args["model_repository"], str(args["model_version"]))
        # Not default_model_filename: the python backend sets that to model.py (this file).
        path = os.path.join(model_dir, "model.onnx")
        # One session per instance: Triton runs one execute() at a time per instance, so the session is
        # never shared between threads, and more throughput comes from more instances in the config.
        providers, provider_options = _providers(params, args)
        self.session = ort.InferenceSession(path, options, providers=providers, provider_options=provider_options)
        dropped = [p for p in providers if p in GPU_PROVIDERS and p not in self.session.get_providers()]
        if dropped:  # ONNX Runtime only warns when a GPU provider's libraries fail to load
            raise ValueError(f"{path}: ONNX Runtime could not start {dropped} (its log says which library is "
                             f"missing): install {', '.join(GPU_PROVIDERS[p] for p in dropped)}")
        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        missing = (session_inputs - {n for n, _, _ in self.inputs}) | ({n for n, _ in self.outputs} - session_outputs)
        if missing:
            # Fails the load with a message in Triton's log instead of failing every request later.
            raise ValueError(f"{path}: config.pbtxt and the ONNX graph disagree on tensors {sorted(missing)}; "
                             f"regenerate the repository from the exported model")
        self.feed_names = [n for n, _, _ in self.inputs if n in session_inputs]

    def _check(self, request):
        """The request's input arrays in config order, or an error message naming the bad input."""
        arrays, rows = [], None
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, f"input '{name}' is missing"
            array = tensor.as_numpy()
            if array.dtype != dtype:
                return None, f"input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype).name}"
            shape = list(array.shape[1:])
            if array.ndim != len(dims) + 1 or any(d != -1 and d != s for d, s in zip(dims, shape)):
                return None, f"input '{name}' has shape {list(array.shape)}, expected [batch] + {dims}"
            if rows is not None and array.shape[0] != rows:
                return None, f"input '{name}' has {array.shape[0]} rows, other inputs have {rows}"
            rows = array.shape[0]
            arrays.append(array)
        return arrays, None

    def execute(self, requests):
        """One response per request, in request order; a bad request fails alone, never the batch."""
        responses = [None] * len(requests)
        groups = {}  # shape signature -> [(request index, arrays)]; only equal shapes can be concatenated
        for i, request in enumerate(requests):
            arrays, problem = self._check(request)
            if problem is not None:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"{self.model_name}: {problem}", "INVALID_ARG"))
                continue
            key = tuple(a.shape[1:] for a in arrays)
            groups.setdefault(key, []).append((i, arrays))

        for members in groups.values():
            # Concatenating the batch is what makes dynamic batching pay off: the python backend costs
            # ~250-300 us per execute() and ONNX Runtime's per-run overhead is paid once for all rows.
            sizes = [arrays[0].shape[0] for _, arrays in members]
            feed = {}
            for k, (name, _, _) in enumerate(self.inputs):
                if name in self.feed_names:
                    parts = [arrays[k] for _, arrays in members]
                    feed[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            try:
                results = self.session.run([n for n, _ in self.outputs], feed)
            except Exception as exc:  # an ORT failure answers these requests with the reason
                # one bad request (e.g. an id beyond the vocabulary) must not fail the others batched with it
                for i, arrays in members:
                    responses[i] = self._run_alone(arrays) if len(members) > 1 else self._failed(exc)
                continue
            bounds = np.cumsum(sizes)[:-1]
            split = [np.split(np.asarray(r, dtype=dt), bounds, axis=0) for r, (_, dt) in zip(results, self.outputs)]
            for j, (i, _) in enumerate(members):
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(parts[j]))
                           for (name, _), parts in zip(self.outputs, split)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _failed(self, exc):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=_error(f"{self.model_name}: inference failed: {exc}", "INTERNAL"))

    def _run_alone(self, arrays):
        """One request's response by itself (after its batch failed): its outputs, or its own error."""
        feed = {name: arrays[k] for k, (name, _, _) in enumerate(self.inputs) if name in self.feed_names}
        try:
            results = self.session.run([n for n, _ in self.outputs], feed)
        except Exception as exc:
            return self._failed(exc)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(np.asarray(r, dtype=dt))) for r, (name, dt) in
            zip(results, self.outputs)])

    def finalize(self):
        """Release the session (and its thread pools) when Triton unloads this instance."""
        self.session = None
