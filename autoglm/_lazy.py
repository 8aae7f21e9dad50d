"""Import heavy libraries on first use, with an error that names what to install.

Which of pyproject.toml's extras brings a library is written once, in :data:`EXTRAS` (a test checks it
against pyproject.toml), so a missing library is reported as ``pip install 'autoglm[compress]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from autoglm.errors import MissingExtraError

EXTRAS = {  # module (or package) -> the extra that installs it
    "onnxruntime": "cpu",  # or `gpu`: both flavours install the same module
    "onnx": "compress",
    "onnxslim": "compress",
    "torch_pruning": "compress",
    "tritonclient": "compress",
    "google.protobuf": "compress",  # with tritonclient[grpc]
    "optuna": "tune",
    "sqlalchemy": "tune",  # with optuna
    "yaml": "deploy",
    "transformers": "hf",
    "tokenizers": "hf",
    "peft": "hf",
    "huggingface_hub": "hf",
    "mlflow": "mlflow",  # mlflow-skinny: tune.mlflow_uri
    "pytriton": "triton",  # nvidia-pytriton, found (not imported) by serve.triton
    "opentelemetry.sdk": "otel",  # serve.gateway.tracing (the API alone comes with fastapi)
    "opentelemetry.exporter.otlp.proto.http": "otel",
    # imported at module level by a stage: a command whose extra is missing names it (autoglm.cli.run_main)
    "torch": "compress",
    "psutil": "tune",
    "matplotlib": "tune",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "locust": "loadtest",
}


def extra_for(module: str) -> str | None:
    """The extra that installs ``module`` (its own entry in :data:`EXTRAS`, else its package's), if any."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        extra = EXTRAS.get(".".join(parts[:end]))
        if extra:
            return extra
    return None


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise MissingExtraError telling how to install it (``extra``, by default
    :func:`extra_for` the module)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or extra_for(module)
        hint = f"pip install 'autoglm[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingExtraError(f"{module} is not importable{why}: {exc}. Install it with: {hint}") from exc
