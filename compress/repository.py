"""Triton model repository writer: typed configs (:mod:`autoglm.triton_config`) and model files -> version
directories; and the compress stage's repository, one model per accepted variant in both flavours.

Layout written by :func:`write_model`::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/model.onnx | model.plan   (+ model.py for the python flavour)

The compress stage adds a numbered version to the run's repository each time it publishes (earlier intact
versions stay, for release and rollback); :mod:`autoglm.versions` keeps their lineage.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm.artifacts import Manifest, RunDir, StageWriter, atomic_output, write_atomic
from autoglm.config import Settings
from autoglm.detokenizer import TABLE_FILE
from autoglm.errors import ConfigError
from autoglm.tasks import IOSpec, TensorSpec
from autoglm.text_codec import decode_table
from autoglm.triton_config import (DynamicBatching, InstanceGroup, ModelConfig, TensorRTAccelerator, render_pbtxt,
                                   serving_instances)
from autoglm.versions import add_version, carried_versions, next_version, write_lineage

if TYPE_CHECKING:
    from compress.recommend import Recommendation
    from compress.variants import Variant


def module_source(name: str) -> bytes:
    """The source of module ``name``, found by the import system wherever its package is installed, and not run:
    python-backend models and their helpers are copied into the repository as files."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ConfigError(f"module {name} has no Python source to copy into the repository: reinstall autoglm")
    return Path(spec.origin).read_bytes()


def python_model_source() -> bytes:
    """The python-backend ``model.py`` (the :mod:`compress.triton_python_model` module, verbatim)."""
    return module_source("compress.triton_python_model")


def write_files(repo_dir: Path | str, cfg: ModelConfig, files: dict[str, Path | bytes], version: int = 1) -> Path:
    """Write ``files`` (name -> source file or content) into the version directory, then ``config.pbtxt``.

    For models made of several files (the generation model: graphs, model.py and its helpers).
    """
    text = render_pbtxt(cfg)
    model_dir = Path(repo_dir) / cfg.name
    for name, source in files.items():
        if isinstance(source, Path) and not source.is_file():
            raise ConfigError(f"{source} does not exist: build it before writing model '{cfg.name}'")
        with atomic_output(model_dir / str(version) / name) as tmp:
            tmp.write_bytes(source) if isinstance(source, bytes) else shutil.copyfile(source, tmp)
            tmp.chmod(0o644)
    with atomic_output(model_dir / "config.pbtxt") as tmp:  # last: a config always has its files
        tmp.write_text(text)
        tmp.chmod(0o644)
    return model_dir


def write_model(repo_dir: Path | str, cfg: ModelConfig, model_file: Path | str, version: int = 1) -> Path:
    """Write ``cfg`` and its model into ``repo_dir``; returns ``<repo_dir>/<name>``.

    Files are written atomically and ``config.pbtxt`` last, so a repository with a config always has
    the model files that config needs.
    """
    model_file = Path(model_file)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"model version {version!r} must be an integer >= 1")
    if not model_file.is_file():
        raise ConfigError(f"model file {model_file} does not exist: export the model first")
    expected = Path(cfg.model_file).suffix
    if model_file.suffix != expected and not (cfg.flavour == "tensorrt" and model_file.suffix == ".engine"):
        raise ConfigError(f"flavour '{cfg.flavour}' serves a {expected} file, got {model_file.name}: "
                          f"pass the {expected} export or pick the matching flavour")
    text = render_pbtxt(cfg)  # render before touching the repository: a bad config writes nothing
    model_dir = Path(repo_dir) / cfg.name
    version_dir = model_dir / str(version)
    files = [(version_dir / cfg.model_file, lambda tmp: shutil.copyfile(model_file, tmp))]
    if cfg.flavour == "python":
        files.append((version_dir / "model.py", lambda tmp: tmp.write_bytes(python_model_source())))
    files.append((model_dir / "config.pbtxt", lambda tmp: tmp.write_text(text)))  # last
    for target, fill in files:
        with atomic_output(target) as tmp:
            fill(tmp)
            tmp.chmod(0o644)  # readable by a server running as another user (temp files start as 0600)
    return model_dir


SERVING_KNOBS = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "instances", "max_queue_size")

GENERATE_IO = IOSpec(
    inputs=(TensorSpec("input_ids", "int64", (-1,)), TensorSpec("max_new_tokens", "int32", (1,)),
            TensorSpec("temperature", "float32", (1,)), TensorSpec("top_k", "int32", (1,)),
            TensorSpec("top_p", "float32", (1,)), TensorSpec("seed", "int64", (1,)),
            TensorSpec("stop", "bytes", (-1,))),
    outputs=(TensorSpec("token_ids", "int64", (-1,)), TensorSpec("text", "bytes", (1,)),
             TensorSpec("finish_reason", "bytes", (1,))))


def write_generate_model(repo: Path, settings: Settings, task, model_args, graphs, version: int = 1) -> str:
    """The decoupled generation model (KV-cache decode loop in Triton's python backend) as ``version``; its name."""
    from compress.decode_engine import SMALL_STEP_FILE

    g = settings.compress.generate
    name = f"{task.name}-generate"
    small = graphs.small_step_path
    cfg = ModelConfig(name=name, io=GENERATE_IO, flavour="python", max_batch_size=0, dynamic_batching=None,
                      instance_group=InstanceGroup(1, "cpu"), warmup_batch_sizes=(), decoupled=True,
                      optional_inputs=tuple(t.name for t in GENERATE_IO.inputs[1:]),
                      parameters={"max_sequences": str(g.max_sequences), "max_waiting": str(g.max_waiting),
                                  "max_new_tokens": str(g.max_new_tokens), "intra_op_threads": str(g.intra_op_threads),
                                  "stream_interval_ms": str(g.stream_interval_ms),
                                  "stream_responses_per_s": str(g.stream_responses_per_s),
                                  "prefill_chunk": str(g.prefill_chunk),
                                  "prefill_thread": g.prefill_thread,
                                  "intra_op_spinning": g.intra_op_spinning,
                                  "small_step_max_batch": str(graphs.small_step["max_batch"] if small else 0)},
                      versions=(version,))
    files = {"prefill.onnx": graphs.prefill, "step.onnx": graphs.step,
             **({SMALL_STEP_FILE: small} if small else {}),
             "model.py": module_source("compress.triton_generate_model"),
             "decode_engine.py": module_source("compress.decode_engine"),
             "sampling.py": module_source("autoglm.sampling"),
             "detokenizer.py": module_source("autoglm.detokenizer"),
             TABLE_FILE: decode_table(task.serving_metadata(model_args)).to_json().encode()}
    for folder in ("python", "native"):  # the NGC container runs the python backend too
        write_files(repo / folder, cfg, files, version)
    return name


def serving_gpus(settings: Settings) -> dict[str, int | None]:
    """The GPU each flavour's instances run on (None: the CPU). The python flavour serves on serve.device; the
    native one (NVIDIA's container) on it too, and on GPU 0 of each pod for ``deploy.env = "gpu"``."""
    from autoglm.device import serving_device

    device = serving_device(settings)
    gpu = (device.index or 0) if device.is_cuda else None
    return {"python": gpu, "native": gpu if gpu is not None or settings.deploy.env != "gpu" else 0}


def _flavours(settings: Settings, model_file: Path, gpus: dict[str, int | None]) -> list[tuple[str, str, dict]]:
    """(folder, flavour, extra ModelConfig fields) of each model written for ``model_file``: GPU instances get
    compress.providers (python flavour) or TensorRT as ONNX Runtime's accelerator (native flavour)."""
    if model_file.suffix == ".plan":
        return [("native", "tensorrt", {})]
    python, native = {}, {}
    cfg = settings.compress
    if gpus["python"] is not None:
        from autoglm.device import settings_providers

        python["parameters"] = {"providers": ",".join(settings_providers(settings).providers),
                                "tensorrt_fp16": str(cfg.tensorrt_fp16).lower()}
    if gpus["native"] is not None and ("auto" in cfg.providers or "tensorrt" in cfg.providers):
        # NVIDIA's container always has TensorRT: INT8 for static QDQ graphs (their scales are in the graph)
        precision = "INT8" if _has_qdq(model_file) else "FP16" if cfg.tensorrt_fp16 else "FP32"
        native["tensorrt"] = TensorRTAccelerator(precision)
    return [("python", "python", python), ("native", "onnxruntime", native)]


def _has_qdq(onnx_file: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_file), load_external_data=False).graph.node)


def write_repository(run: RunDir, settings: Settings, task, model_args, variants: list[Variant],
                     choice: Recommendation, graphs=None, lineage: dict | None = None) -> Manifest:
    """One Triton model per accepted variant, in both flavours, as a new numbered version beside the intact
    earlier ones, made the stable one; its own manifest. ``task.json`` and the manifest name the recommended model
    and keep why compress chose it (``recommendation``); ``lineage`` (run, trial, source checkpoint) goes into the
    version's lineage entry."""
    t = settings.compress.triton
    gpus = serving_gpus(settings)
    config = {"triton": t.model_dump(mode="json")}
    if any(g is not None for g in gpus.values()):  # GPU repositories differ; CPU ones keep their old config
        config |= {"gpus": gpus, "providers": settings.compress.providers,
                   "tensorrt_fp16": settings.compress.tensorrt_fp16}
    writer = StageWriter(run, "repository", config, inputs=["compress"])
    writer.invalidate()
    models = {v.name: f"{task.name}-{v.name}" for v in variants if v.status == "ok"}
    generate_name = f"{task.name}-generate" if graphs is not None else None
    # models not published now must not load; earlier versions of the ones that are stay, if intact
    versions = carried_versions(writer.dir, {*models.values(), *([generate_name] if generate_name else [])})
    version = next_version(versions)
    io = task.io_spec(model_args)
    batching = DynamicBatching(max_queue_delay_us=t.max_queue_delay_us,
                               preferred_batch_sizes=tuple(t.preferred_batch_sizes), max_queue_size=t.max_queue_size)
    for variant in (v for v in variants if v.status == "ok"):
        name = models[variant.name]
        for folder, flavour, extra in _flavours(settings, variant.path, gpus):
            gpu = gpus.get(folder)
            if flavour == "tensorrt" and gpu is None:
                gpu = 0  # an engine runs on a GPU only
            parameters = {} if flavour == "tensorrt" else {"intra_op_threads": str(t.intra_op_threads)}
            cfg = ModelConfig(name=name, io=io, flavour=flavour, max_batch_size=t.max_batch_size,
                              dynamic_batching=batching, instance_group=serving_instances(t.instances, gpu),
                              parameters=parameters | extra.get("parameters", {}),
                              warmup_batch_sizes=(1,), tensorrt=extra.get("tensorrt"), versions=(version,))
            write_model(writer.dir / folder, cfg, variant.path, version)
    task_info = {"task": task.name, "metric": task.metric, "direction": task.direction, "model_args": model_args,
                 "io": asdict(io), "metadata": task.serving_metadata(model_args), "models": models,
                 "recommended": models[choice.variant], "recommendation": choice.record()}
    if graphs is not None:
        task_info["generate"] = write_generate_model(writer.dir, settings, task, model_args, graphs, version)
    write_atomic(writer.dir / "task.json", (json.dumps(task_info, indent=2) + "\n").encode())
    add_version(versions, writer.dir, version, {"source": "compress", "run": run.name, **(lineage or {}),
                                                "variants": models, "recommended": models[choice.variant],
                                                "triton": {k: config["triton"][k] for k in SERVING_KNOBS}})
    write_lineage(writer.dir, versions)
    for path in sorted(p for p in writer.dir.rglob("*") if p.is_file() and p.name != "manifest.json"):
        writer.add_output(str(path.relative_to(writer.dir)))
    writer.manifest.metrics = {"models": models, "recommended": models[choice.variant], "task": task.name,
                               "model_args": model_args, "recommendation": choice.record(), "version": version,
                               "lineage": versions}
    return writer.commit()
