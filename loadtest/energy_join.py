"""Energy of the serving processes over one window: a hardware counter, else their CPU-seconds x watts.

NVML (GPU) and RAPL (CPU package) count the whole device or host; where neither exists the estimate
counts the CPU-seconds of Triton (with its python-backend stub processes, where the models run) and
the gateway (with its worker processes), found by the ports they listen on or given as pids, times
``measure.watts_per_core``, and says ``estimated`` in its method. The load generator is never counted:
it is the clients' cost, not the service's. Each window also records the peak RSS of Triton's processes
(:class:`PeakRss`), which deploy sizes the Triton container's memory from.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from autoglm.energy import CpuEstimateMeter, Meter, energy_meter


def port_of(url: str) -> int | None:
    """The TCP port of ``url`` (default 80/443 by scheme); None when it has no host."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    return parts.port or (443 if parts.scheme == "https" else 80)


def is_local(url: str) -> bool:
    """True when ``url`` points at this machine (its processes can then be metered)."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    return host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")


def listening_pids(ports: Iterable[int]) -> list[int]:
    """Processes listening on ``ports`` here (processes of other users may be invisible without root)."""
    import psutil

    wanted = set(ports)
    pids = set()
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in wanted and conn.pid:
                pids.add(conn.pid)
    return sorted(pids)


def with_children(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their descendants that are running now (Triton's stubs, uvicorn's workers)."""
    import psutil

    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found.add(pid)
            found.update(child.pid for child in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


class PeakRss:
    """The peak resident memory of a set of processes over one window, sampled while it runs.

    RSS summed over the processes: a page two of them share counts twice, so the figure is at or above what a
    container's memory cgroup charges for them (deploy sizes Triton's memory from it, with headroom).
    """

    def __init__(self, pids: Iterable[int], every_s: float = 0.25) -> None:
        import psutil

        self._psutil, self.every_s = psutil, every_s
        self.pids = sorted(set(pids))
        self._procs = []
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.append(psutil.Process(pid))
        self.peak_bytes, self.samples, self._next = 0, 0, 0.0

    def sample(self, now: float | None = None) -> None:
        """Add one sample, unless the last was under ``every_s`` ago (``now``: time.monotonic())."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + self.every_s
        total = 0
        for proc in self._procs:
            with contextlib.suppress(self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                total += proc.memory_info().rss
        self.peak_bytes, self.samples = max(self.peak_bytes, total), self.samples + 1

    def result(self) -> dict[str, Any]:
        """The window's record: peak RSS in MiB over its samples and the processes sampled."""
        if not self.samples or not self.peak_bytes:
            return {"unavailable": f"no RSS readable for the processes {self.pids}"}
        return {"peak_rss_mib": round(self.peak_bytes / 2**20, 1), "samples": self.samples, "pids": self.pids}


@dataclass
class EnergySource:
    """Makes one meter per window. Pids are looked up again for every window, because a serving config
    with more instances starts new stub processes."""

    kind: str = "auto"
    watts_per_core: float = 10.0
    urls: tuple[str, ...] = ()  # serving endpoints whose local listeners (and children) are metered
    pids: tuple[int, ...] = ()  # given explicitly (e.g. a gateway started elsewhere)
    memory_urls: tuple[str, ...] = ()  # endpoints whose local process trees' peak RSS each window records (Triton's)
    unavailable: str | None = field(default=None, init=False)

    def serving_pids(self) -> list[int]:
        ports = [port for url in self.urls if is_local(url) and (port := port_of(url))]
        return with_children([*self.pids, *listening_pids(ports)])

    def peak_rss(self) -> PeakRss | str:
        """A sampler of the peak RSS of the processes serving ``memory_urls`` (with their children: Triton's
        stubs) for the next window; a sentence saying why not when none is found here."""
        ports = [port for url in self.memory_urls if is_local(url) and (port := port_of(url))]
        pids = with_children(listening_pids(ports)) if ports else []
        if not pids:
            return (f"no local process serves {', '.join(self.memory_urls)} (remote, or another user's)"
                    if self.memory_urls else "no endpoint to sample the memory of")
        return PeakRss(pids)

    def meter(self) -> Meter | None:
        """A started-ready meter for the next window; None (with ``unavailable`` set) when nothing to meter."""
        pids = self.serving_pids()
        meter = energy_meter(self.kind, self.watts_per_core, pids or None)  # type: ignore[arg-type]
        if isinstance(meter, CpuEstimateMeter) and not pids:
            # Without pids the estimate would meter this process, which does none of the serving.
            self.unavailable = ("no serving process found on this host (remote target, or processes of another "
                                "user): pass --pid for Triton and the gateway, or run where they run")
            return None
        self.unavailable = None
        return meter
