"""The gateway's settings: the core's :class:`~autoglm.gateway_spec.GatewaySpec` (what deploy renders and a
worker reads from its JSON file) plus what a running worker derives from it (its upstream pool and address)
and the directory where the workers of one gateway share their metrics and rate-limit buckets.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from autoglm.errors import ConfigError
from autoglm.gateway_spec import GatewaySpec


class GatewaySettings(GatewaySpec):
    """Everything one gateway worker needs: the configured ``serve.gateway`` limits, where it listens, the
    Triton it forwards to, and the API keys (:meth:`from_settings` builds it from the run's config)."""

    shared_dir: Path | None = Field(None, description="a directory on this host where the workers of one gateway "
                                    "share their metrics (prometheus-client's multiprocess files) and rate-limit "
                                    "buckets; the runner makes a fresh one for --workers N > 1 and removes it on "
                                    "stop. None: each worker counts and limits alone")

    routing_file: Path | None = Field(None, description="the routing file of the release commands (stable and "
                                      "canary version of each model, the canary's weight; serve/routing.json of the "
                                      "run, written by the runner). None: requests go to Triton unversioned")
    client_header: str = Field("x-client-id", description="the request header naming a client without an API key: "
                               "its requests stay on one version during a canary (serve.canary.client_header)")

    @property
    def pool_size(self) -> int:
        """Upstream connections: peak in-flight by default, so no admitted request waits for one."""
        return self.upstream_connections or self.max_in_flight

    @property
    def upstream_address(self) -> tuple[str, int]:
        """(host, port) of ``triton_url``."""
        hostport = self.triton_url.removeprefix("http://").split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"triton_url={self.triton_url!r} needs an explicit port, e.g. http://127.0.0.1:8000")
        return host.strip("[]"), int(port)
