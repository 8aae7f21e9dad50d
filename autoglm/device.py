"""Where work runs: the torch device of ``run.device``/``serve.device`` and ONNX Runtime's execution providers.

Both are chosen once, here, from the config and from what this host really has, so training, timing, the
generated Triton models and the energy meters agree on one device. ``auto`` takes a GPU only where torch (or
ONNX Runtime) sees one, so a CPU-only host behaves as if nothing GPU-related existed. A GPU or provider that
is asked for by name and missing is an error naming the package to install, never a silent CPU fallback;
what ``auto`` fell back from is recorded (``fallback``) for the manifest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from autoglm.errors import ConfigError

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"  # the values of run.device and serve.device
TENSORRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDERS = {"tensorrt": TENSORRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}  # compress.providers' names
GPU_PROVIDERS = (TENSORRT_EP, CUDA_EP)
# what brings each provider into `onnxruntime.get_available_providers()`
PROVIDER_PACKAGES = {
    TENSORRT_EP: "onnxruntime-gpu and tensorrt (pip install 'autoglm[gpu]', with TensorRT's libraries on "
                 "LD_LIBRARY_PATH)",
    CUDA_EP: "onnxruntime-gpu in place of onnxruntime (pip install 'autoglm[gpu]'; CUDA 12 and cuDNN 9 "
             "libraries, e.g. from torch's CUDA wheels)",
}


@dataclass(frozen=True)
class DeviceChoice:
    """A resolved device: ``kind`` cpu or cuda, the CUDA ordinal among the visible GPUs, and why."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None
    requested: str = "auto"
    reason: str = ""  # what "auto" saw, for the manifest

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch(self) -> str:
        """The torch device string: ``cpu`` or ``cuda:N``."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index or 0}"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.torch, "requested": self.requested, "reason": self.reason}


CPU = DeviceChoice("cpu", None, "cpu")


def _torch_cuda(torch_module: Any = None) -> tuple[bool, int, str]:
    """(available, device count, a sentence on what torch is) -- no torch counts as no CUDA."""
    if torch_module is None:
        try:
            import torch as torch_module
        except ImportError:
            return False, 0, "torch is not installed"
    cuda = torch_module.cuda
    built = getattr(getattr(torch_module, "version", None), "cuda", None)
    what = f"torch {getattr(torch_module, '__version__', '?')} ({'CUDA ' + built if built else 'CPU-only build'})"
    if not cuda.is_available():
        return False, 0, f"{what} sees no CUDA device"
    return True, int(cuda.device_count()), what


def resolve_device(spec: str = "auto", torch_module: Any = None, setting: str = "run.device") -> DeviceChoice:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a :class:`DeviceChoice` for this host.

    ``auto`` is CUDA device 0 where torch sees CUDA, else the CPU. ``cuda`` or ``cuda:N`` where torch does
    not see that device is a ConfigError naming the fix; ``N`` counts the GPUs ``CUDA_VISIBLE_DEVICES`` leaves.
    """
    if not re.fullmatch(DEVICE_PATTERN, spec or ""):
        raise ConfigError(f"{setting}={spec!r} is not a device: use auto, cpu, cuda or cuda:N")
    if spec == "cpu":
        return CPU
    available, count, what = _torch_cuda(torch_module)
    if spec == "auto":
        return DeviceChoice("cuda", 0, spec, what) if available else DeviceChoice("cpu", None, spec, what)
    index = int(spec.partition(":")[2] or 0)
    if not available:
        raise ConfigError(f"{setting}={spec!r} but {what}: install a CUDA build of torch (pip install torch "
                          f"--index-url https://download.pytorch.org/whl/cu128) on a GPU host, or set {setting}="
                          f"'auto' (CUDA where present) or 'cpu'")
    if index >= count:
        raise ConfigError(f"{setting}={spec!r} but torch sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): use cuda:0..cuda:{count - 1}")
    return DeviceChoice("cuda", index, spec, what)


def serving_device(settings: Any, torch_module: Any = None) -> DeviceChoice:
    """``serve.device`` resolved; its ``auto`` follows ``run.device`` (train and serve on one kind of device)."""
    spec = settings.serve.device
    if spec == "auto":
        spec = settings.run.device
    return resolve_device(spec, torch_module, setting="serve.device")


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: entries (indices, ``GPU-`` or ``MIG-`` UUIDs or their
    prefixes) up to the first invalid one; ``None`` when unset (every GPU is visible), ``[]`` for none."""
    raw = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries = []
    for entry in (e.strip() for e in raw.split(",")):
        # CUDA stops at the first entry that is not a device: "0,-1,1" means GPU 0 only
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


# ---- ONNX Runtime execution providers ---------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderChoice:
    """The providers an ONNX Runtime session gets, in priority order, with their options."""

    providers: tuple[str, ...]
    options: tuple[dict[str, str], ...] = ()
    device: str = "cpu"
    fallback: str | None = None  # why "auto" has fewer GPU providers than the device could use
    requested: tuple[str, ...] = ("auto",)

    @property
    def uses_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    def session_args(self) -> dict[str, Any]:
        """Keyword arguments for ``onnxruntime.InferenceSession``."""
        return {"providers": list(self.providers), "provider_options": [dict(o) for o in self.options]}

    def to_dict(self) -> dict[str, Any]:
        return {"providers": list(self.providers), "device": self.device, "fallback": self.fallback,
                "requested": list(self.requested)}


def provider_name(name: str) -> str:
    """``tensorrt``/``cuda``/``cpu`` or an ONNX Runtime provider name -> the provider name."""
    if name in PROVIDERS.values():
        return name
    if name.lower() in PROVIDERS:
        return PROVIDERS[name.lower()]
    raise ConfigError(f"execution provider {name!r} is unknown: use auto, or a list of tensorrt, cuda and cpu")


def available_providers() -> list[str]:
    """What this host's onnxruntime can run (the CPU wheel: CPU only; onnxruntime-gpu: CUDA, TensorRT too)."""
    from autoglm._lazy import require

    return list(require("onnxruntime", purpose="choosing execution providers").get_available_providers())


def provider_options(provider: str, device: DeviceChoice, fp16: bool = False,
                     cache_dir: str | None = None) -> dict[str, str]:
    """Options of one provider on ``device``: the GPU ordinal; TensorRT's FP16 and engine cache."""
    if provider == CUDA_EP:
        return {"device_id": str(device.index or 0)}
    if provider == TENSORRT_EP:
        opts = {"device_id": str(device.index or 0), "trt_fp16_enable": str(fp16)}
        if cache_dir:  # TensorRT builds an engine per shape profile: minutes the cache saves on every start
            opts |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache_dir}
        return opts
    return {}


def choose_providers(requested: Sequence[str] | str = ("auto",), device: DeviceChoice = CPU,
                     available: Sequence[str] | None = None, *, fp16: bool = False,
                     cache_dir: str | None = None) -> ProviderChoice:
    """Providers for sessions whose work belongs on ``device`` (``compress.providers`` and ``serve.device``).

    ``auto``: on a GPU, TensorRT where ONNX Runtime has it, then CUDA, then CPU; on the CPU, the CPU provider
    alone. What auto could not get on a GPU is recorded in ``fallback``. Named providers are used as named and
    each one missing from ``available`` (default: this host's onnxruntime) is a ConfigError naming its package.
    """
    names = (requested,) if isinstance(requested, str) else tuple(requested)
    if not names:
        raise ConfigError("compress.providers is empty: use ['auto'] or a list of tensorrt, cuda and cpu")
    have = list(available_providers() if available is None else available)
    fallback = None
    if "auto" in names:
        if len(names) > 1:
            raise ConfigError(f"compress.providers={list(names)}: 'auto' stands alone; list providers by name "
                              "or write ['auto']")
        chosen = [p for p in GPU_PROVIDERS if p in have] if device.is_cuda else []
        missing = [p for p in GPU_PROVIDERS if p not in have] if device.is_cuda else []
        if missing:
            fallback = "; ".join(f"{p} is not in this onnxruntime (install {PROVIDER_PACKAGES[p]})" for p in missing)
        chosen.append(CPU_EP)
    else:
        chosen = list(dict.fromkeys(provider_name(n) for n in names))
        absent = [p for p in chosen if p not in have]
        if absent:
            raise ConfigError("; ".join(f"compress.providers asks for {p}, which this onnxruntime lacks (it has "
                                        f"{', '.join(have)}): install {PROVIDER_PACKAGES.get(p, p)}"
                                        for p in absent))
        gpu = [p for p in chosen if p in GPU_PROVIDERS]
        if gpu and not device.is_cuda:
            raise ConfigError(f"compress.providers asks for {', '.join(gpu)} but the models are served on the CPU "
                              f"(serve.device resolves to cpu): set serve.device='cuda' or drop the GPU providers")
    options = tuple(provider_options(p, device, fp16, cache_dir) for p in chosen)
    return ProviderChoice(tuple(chosen), options, device.torch, fallback, names)


def settings_providers(settings: Any, available: Sequence[str] | None = None,
                       torch_module: Any = None) -> ProviderChoice:
    """The run's providers: ``compress.providers`` for models served on ``serve.device``."""
    cfg = settings.compress
    return choose_providers(cfg.providers, serving_device(settings, torch_module), available,
                            fp16=cfg.tensorrt_fp16)
