"""Energy meters: a real counter where the host has one, else an estimate that says so.

Three sources, tried in this order by ``energy_meter("auto")``:

* NVML: board energy of the GPUs this process uses, from the total-energy counter (mJ, Volta and newer) or
  from sampled power where a GPU has no counter.
* RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``): CPU package energy of the whole host, so other
  tenants of a shared machine are counted too.
* An estimate: CPU-seconds of this process (or of given pids, e.g. Triton and the gateway) times a
  configured watts per core. Its ``method`` starts with ``"estimated"`` and it must never be compared with
  a measured value: :func:`ensure_comparable` refuses such a mix.

Every meter is a context manager (``with meter: ...`` then ``meter.reading``) or ``start()``/``stop()``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from autoglm.device import visible_gpus
from autoglm.errors import AutoGLMError

EnergyKind = Literal["auto", "nvml", "rapl", "estimated"]
Device = str  # where the measured work runs: "cpu", "cuda", "cuda:N" (a visible GPU) or "any"
log = logging.getLogger(__name__)
_FIX = 'set measure.energy = "estimated" to use CPU-seconds x measure.watts_per_core, labelled estimated'


class MeterUnavailable(AutoGLMError):
    """This host cannot provide the requested energy counter; the message says why."""


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one measured window; ``method`` tells where the number comes from."""

    joules: float
    seconds: float
    method: str

    @property
    def measured(self) -> bool:
        """True for a hardware counter, False for an estimate."""
        return not self.method.startswith("estimated")

    def per_item(self, n: int) -> float:
        """Joules per item when ``n`` items were processed in the window."""
        if n < 1:
            raise ValueError(f"per_item needs n >= 1 items, got {n}")
        return self.joules / n

    def to_dict(self) -> dict[str, Any]:
        return {"joules": self.joules, "seconds": self.seconds, "method": self.method, "measured": self.measured}


class Meter:
    """Base class: subclasses sample a cumulative counter and turn two samples into joules."""

    method: str = ""
    min_window_s: float = 0.0
    """Shortest window that gives a meaningful figure (counter update period and resolution)."""

    def __init__(self) -> None:
        self.fallback_reason: str | None = None  # set by energy_meter("auto") when it skipped better meters
        self._start: tuple[float, Any] | None = None
        self._reading: EnergyReading | None = None

    def _sample(self) -> Any:
        raise NotImplementedError

    def _joules(self, begin: Any, end: Any) -> float:
        raise NotImplementedError

    def start(self) -> None:
        """Open a window (a running window is restarted)."""
        self._reading = None
        self._start = (time.perf_counter(), self._sample())

    def stop(self) -> EnergyReading:
        """Close the window and return (and keep in ``reading``) its energy."""
        if self._start is None:
            raise RuntimeError(f"{type(self).__name__}.stop() called before start()")
        end = self._sample()
        t0, begin = self._start
        self._start = None
        self._reading = EnergyReading(self._joules(begin, end), time.perf_counter() - t0, self.method)
        return self._reading

    @property
    def reading(self) -> EnergyReading:
        """The last closed window."""
        if self._reading is None:
            raise RuntimeError(f"{type(self).__name__} has no reading yet: use it as `with meter:` or stop() it")
        return self._reading

    def __enter__(self) -> Meter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r})"


@dataclass(frozen=True)
class _Gpu:
    index: int  # NVML's
    counter: bool  # has the total-energy counter (Volta and newer); else its power is sampled


class _PowerSampler:
    """Integrates NVML board power (mW) of some GPUs over a window, sampled on a thread (trapezoids)."""

    def __init__(self, read_watts, interval_s: float) -> None:
        self._read, self._interval = read_watts, interval_s
        self._stop = threading.Event()
        self._samples: list[tuple[float, float]] = []
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="nvml-power", daemon=True)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self._samples.append((time.perf_counter(), self._read()))
        except Exception as exc:  # noqa: BLE001 - kept for joules(): a window with a gap must not pass as whole
            self._error = exc

    def start(self) -> None:
        self._samples.append((time.perf_counter(), self._read()))
        self._thread.start()

    def joules(self) -> float:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise MeterUnavailable(f"NVML power sampling failed mid-window: {type(self._error).__name__}: "
                                   f"{self._error}") from self._error
        self._samples.append((time.perf_counter(), self._read()))
        pts = self._samples
        return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(pts, pts[1:]))


class NvmlMeter(Meter):
    """GPU board energy from NVML, over the GPUs this process uses (Zeus's approach).

    Which GPUs: ``device`` ("cuda:N" is the N-th GPU that ``CUDA_VISIBLE_DEVICES`` leaves; "cuda" or None all
    of those), or ``device_index`` (an NVML index, ignoring CUDA_VISIBLE_DEVICES). CUDA_VISIBLE_DEVICES entries
    may be indices or GPU UUIDs (or their prefixes); NVML's index order is the PCI bus order, which is CUDA's
    only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set it, or list UUIDs, on hosts with mixed GPUs).

    Each GPU is read with the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and
    newer) where it has one, else its board power is sampled every ``sample_interval_s`` and integrated; the
    method says which ("nvml" or "nvml:power-sampled"). Both are measured.
    """

    method = "nvml"
    min_window_s = 1.0  # the counter updates every few tens of ms

    def __init__(self, device_index: int | None = None, *, device: str | None = None,
                 env: Mapping[str, str] | None = None, sample_interval_s: float = 0.05) -> None:
        super().__init__()
        try:
            self._nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            raise MeterUnavailable(f"pynvml is not importable ({exc}); pip install 'autoglm[gpu]'") from exc
        self.sample_interval_s = sample_interval_s
        self._sampler: _PowerSampler | None = None
        self._window: contextlib.AbstractContextManager | None = None
        with self._session() as nvml:  # probe now: an unusable NVML fails at construction, not mid-measurement
            self.gpus = [self._describe(nvml, i) for i in self._select(nvml, device_index, device, env)]
        if not all(g.counter for g in self.gpus):
            self.method = "nvml:power-sampled"

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise MeterUnavailable(f"NVML cannot start: {type(exc).__name__}: {exc}") from exc
        try:
            yield nvml
        except nvml.NVMLError as exc:
            raise MeterUnavailable(f"NVML energy unusable: {type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()  # reference-counted by NVML: balances the init above

    @staticmethod
    def _select(nvml: Any, device_index: int | None, device: str | None, env: Mapping[str, str] | None) -> list[int]:
        """NVML indices of the GPUs to meter."""
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise MeterUnavailable("NVML sees no GPU")
        if device_index is not None:
            if not 0 <= device_index < count:
                raise MeterUnavailable(f"GPU index {device_index} does not exist (NVML sees {count})")
            return [device_index]
        visible = visible_gpus(env)
        if visible is None:
            visible = [str(i) for i in range(count)]
        if not visible:
            raise MeterUnavailable("CUDA_VISIBLE_DEVICES hides every GPU from this process")
        ordinal = device.partition(":")[2] if device else ""
        if ordinal:  # "cuda:N": the N-th visible GPU only
            if int(ordinal) >= len(visible):
                raise MeterUnavailable(f"{device} is not among the {len(visible)} visible GPU(s) {visible}")
            visible = [visible[int(ordinal)]]
        indices = []
        for entry in visible:
            if entry.isdigit():
                if int(entry) >= count:
                    raise MeterUnavailable(f"CUDA_VISIBLE_DEVICES names GPU {entry}; NVML sees {count}")
                indices.append(int(entry))
                continue
            if entry.startswith("MIG-"):
                raise MeterUnavailable(f"{entry} is a MIG instance: NVML reports energy per whole GPU, not per "
                                       "MIG slice (measure the whole GPU, or use an estimate)")
            match = [i for i in range(count)
                     if _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))).startswith(entry)]
            if len(match) != 1:
                raise MeterUnavailable(f"CUDA_VISIBLE_DEVICES entry {entry} matches {len(match)} GPUs by UUID")
            indices.append(match[0])
        return indices

    @staticmethod
    def _describe(nvml: Any, index: int) -> _Gpu:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return _Gpu(index, True)
        except nvml.NVMLError as exc:
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except nvml.NVMLError as power:
                raise MeterUnavailable(f"GPU {index} reports neither energy ({type(exc).__name__}: {exc}) nor "
                                       f"power ({type(power).__name__}: {power})") from power
            log.info("GPU %d has no energy counter (%s): sampling its power", index, exc)
            return _Gpu(index, False)

    def _handles(self, counter: bool) -> list:
        nvml = self._nvml
        return [nvml.nvmlDeviceGetHandleByIndex(g.index) for g in self.gpus if g.counter == counter]

    def start(self) -> None:
        self._close()  # a running window is restarted
        self._window = self._session()
        self._window.__enter__()  # NVML stays initialised for the window: the sampler reads it meanwhile
        try:
            sampled = self._handles(counter=False)
            if sampled:
                nvml = self._nvml
                self._sampler = _PowerSampler(lambda: sum(nvml.nvmlDeviceGetPowerUsage(h) for h in sampled) / 1e3,
                                              self.sample_interval_s)
                self._sampler.start()
            super().start()
        except BaseException:
            self._close()
            raise

    def stop(self) -> EnergyReading:
        try:
            return super().stop()
        finally:
            self._close()

    def _close(self) -> None:
        if self._sampler is not None:
            self._sampler.joules()  # stops its thread
            self._sampler = None
        window, self._window = self._window, None
        if window is not None:
            window.__exit__(None, None, None)

    def _sample(self) -> float:
        nvml = self._nvml
        try:
            return sum(nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles(counter=True)) / 1e3
        except nvml.NVMLError as exc:
            raise MeterUnavailable(f"NVML energy counter unusable: {type(exc).__name__}: {exc}") from exc

    def _joules(self, begin: float, end: float) -> float:
        sampled, self._sampler = self._sampler, None
        return end - begin + (sampled.joules() if sampled else 0.0)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RaplMeter(Meter):
    """CPU package energy from the powercap sysfs tree (all ``intel-rapl:N`` packages summed)."""

    method = "rapl"
    min_window_s = 0.1  # updates about every ms; short windows are dominated by jitter

    def __init__(self, root: Path | str = Path("/sys/class/powercap")) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise MeterUnavailable(f"no RAPL: {self.root} does not exist (not Intel/AMD, or a VM hides it)")
        # Package domains only: subdomains (intel-rapl:0:0, core/uncore/dram) are already inside them.
        self.domains = sorted(p for p in self.root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
        if not self.domains:
            raise MeterUnavailable(f"no RAPL package domain (intel-rapl:N) under {self.root}")
        try:
            self._ranges = [int((d / "max_energy_range_uj").read_text()) for d in self.domains]
            self._sample()
        except PermissionError as exc:
            raise MeterUnavailable(f"RAPL counters are readable by root only here: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"RAPL counters unreadable: {exc}") from exc

    def _sample(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def _joules(self, begin: list[int], end: list[int]) -> float:
        # A counter that went down wrapped once at max_energy_range_uj (≈262 kJ: ~45 min at 100 W);
        # windows longer than one wrap period would be undercounted.
        total = sum(e - b if e >= b else e + rng - b for b, e, rng in zip(begin, end, self._ranges, strict=True))
        return total / 1e6


class CpuEstimateMeter(Meter):
    """Estimated energy: CPU-seconds (user+system) x ``watts_per_core``; labelled estimated."""

    def __init__(self, watts_per_core: float, pids: Sequence[int] | None = None) -> None:
        super().__init__()
        if watts_per_core <= 0:
            raise ValueError(f"watts_per_core must be > 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core
        self.pids = list(pids) if pids else None
        self.lost_pids: list[int] = []  # pids not running for the whole last window: their CPU time is missing
        self.method = f"estimated:cpu-s×{watts_per_core:g}W"
        if self.pids:
            import psutil  # only needed for other processes

            self._psutil = psutil
            self._procs = {}
            for pid in self.pids:
                with contextlib.suppress(psutil.NoSuchProcess):  # already gone: no energy from now on
                    self._procs[pid] = psutil.Process(pid)
            self.min_window_s = 0.2  # /proc reports CPU time in 10 ms ticks
            if not self._procs:
                raise MeterUnavailable(f"none of the processes {self.pids} is running")

    def _sample(self) -> dict[int, float]:
        if not self.pids:
            # process_time has ns resolution; psutil's /proc reading has 10 ms ticks.
            return {os.getpid(): time.process_time()}
        seconds = {}
        for pid, proc in self._procs.items():
            try:
                t = proc.cpu_times()
                seconds[pid] = t.user + t.system
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return seconds

    def _joules(self, begin: dict[int, float], end: dict[int, float]) -> float:
        both = begin.keys() & end.keys()
        self.lost_pids = sorted(set(self.pids or ()) - both)
        cpu_s = sum(end[pid] - begin[pid] for pid in both)
        return cpu_s * self.watts_per_core


def energy_meter(kind: EnergyKind = "auto", watts_per_core: float = 10.0,
                 pids: Sequence[int] | None = None, device: Device = "any") -> Meter:
    """The meter for ``measure.energy``: "auto" tries NVML, then RAPL, then the CPU estimate.

    ``device`` is where the measured work runs: for work on the CPU "auto" skips NVML (a GPU's board
    energy, idle meanwhile, is not that work's energy); "cuda:N" meters that visible GPU only, "cuda" and
    "any" every GPU ``CUDA_VISIBLE_DEVICES`` leaves this process. With "auto", ``meter.fallback_reason`` records why
    each measured meter was skipped. An explicit "nvml" or "rapl" that this host cannot provide raises
    MeterUnavailable naming the reason and the fix.
    """
    if kind == "estimated":
        return CpuEstimateMeter(watts_per_core, pids)
    gpu = device if device.startswith("cuda") else None
    makers = {"nvml": lambda: NvmlMeter(device=gpu), "rapl": RaplMeter}
    if kind in makers:
        try:
            return makers[kind]()
        except MeterUnavailable as exc:
            raise MeterUnavailable(f'measure.energy = "{kind}" is unavailable on this host: {exc}; {_FIX}') from exc
    if kind != "auto":
        raise ValueError(f"unknown energy meter kind {kind!r}: use auto, nvml, rapl or estimated")
    skipped = []
    if device == "cpu":
        makers.pop("nvml")
        skipped.append("nvml: the work runs on the CPU")
    for name, make in makers.items():
        try:
            return make()
        except MeterUnavailable as exc:
            skipped.append(f"{name}: {exc}")
    meter = CpuEstimateMeter(watts_per_core, pids)
    meter.fallback_reason = "; ".join(skipped)
    return meter


def ensure_comparable(readings: Iterable[EnergyReading | Mapping[str, Any]]) -> str | None:
    """Raise ValueError unless all readings share one method; return that method (None if empty).

    Accepts readings or their ``to_dict()`` form (as stored in manifests). Never compare measured
    with estimated energy, nor estimates made with different watts per core.
    """
    methods = {r.method if isinstance(r, EnergyReading) else str(r["method"]) for r in readings}
    if len(methods) <= 1:
        return next(iter(methods), None)
    kinds = {m.startswith("estimated") for m in methods}
    why = "measured and estimated energy are mixed" if len(kinds) == 2 else "energy comes from different methods"
    raise ValueError(f"{why} ({', '.join(sorted(methods))}): never compare measured with estimated, "
                     "nor figures from different meters; measure every candidate with one meter")
