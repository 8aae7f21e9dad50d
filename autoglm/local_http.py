"""HTTP to processes on this host (Triton, the gateway, Prometheus), shared by serve and loadtest.

Requests go direct: a configured ``http_proxy`` must never see loopback traffic.
"""

from __future__ import annotations

import urllib.request

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def client_host(host: str) -> str:
    """Where a client reaches a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def answers_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when ``url`` answers 200 within ``timeout_s``; False when it errs or cannot be reached."""
    try:
        with DIRECT.open(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False
