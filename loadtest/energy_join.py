"""Energy of the serving processes over one window: a hardware counter, else their CPU-seconds x watts.

NVML (GPU) and RAPL (CPU package) count the whole device or host; where neither exists the estimate
counts the CPU-seconds of Triton (with its python-backend stub processes, where the models run) and
the gateway (with its worker processes), found by the ports they listen on or given as pids, times
``measure.watts_per_core``, and says ``estimated`` in its method. The load generator is never counted:
it is the clients' cost, not the service's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
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


@dataclass
class EnergySource:
    """Makes one meter per window. Pids are looked up again for every window, because a serving config
    with more instances starts new stub processes."""

    kind: str = "auto"
    watts_per_core: float = 10.0
    urls: tuple[str, ...] = ()  # serving endpoints whose local listeners (and children) are metered
    pids: tuple[int, ...] = ()  # given explicitly (e.g. a gateway started elsewhere)
    unavailable: str | None = field(default=None, init=False)

    def serving_pids(self) -> list[int]:
        ports = [port for url in self.urls if is_local(url) and (port := port_of(url))]
        return with_children([*self.pids, *listening_pids(ports)])

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
