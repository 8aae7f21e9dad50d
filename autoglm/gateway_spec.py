"""What one gateway worker is given: where it listens, the Triton it forwards to, its limits and its API keys.

deploy renders a :class:`GatewaySpec` as the gateway's settings JSON and the gateway reads it back
(``serve.settings.GatewaySettings`` adds what a running worker derives from it), so both validate one
model. API keys are stored only as sha256 hex digests (:func:`hash_api_key`); a key file holds one
``name:sha256`` per line. Binding beyond loopback without keys is refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoglm.config import GatewayLimits, Settings
from autoglm.errors import ConfigError

_HEX64 = re.compile(r"[0-9a-f]{64}")
# uvicorn's --http for the gateway: its httptools protocol with the fast routes' lean request cycle
# (serve.gateway.http_protocol); named here so that serve and deploy start the gateway alike
UVICORN_HTTP = "serve.gateway.http_protocol:GatewayProtocol"


def hash_api_key(key: str) -> str:
    """The sha256 hex digest stored in place of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random API key (shown once; store only its hash)."""
    return "agk_" + secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """True for addresses reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


class ApiKey(BaseModel):
    """One client's key, by name (used in logs and rate-limit buckets) and sha256 digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    sha256: str = Field(description="hex sha256 of the key; see `python -m serve --new-api-key NAME`")

    @model_validator(mode="after")
    def _digest(self) -> ApiKey:
        if not _HEX64.fullmatch(self.sha256):
            raise ValueError(f"API key '{self.name}': sha256 must be 64 lowercase hex digits (store the hash, "
                             f"never the key: `python -m serve --new-api-key {self.name}` prints both)")
        return self


def read_key_file(path: Path | str) -> list[ApiKey]:
    """Parse a key file: ``name:sha256`` per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"API key file {path} does not exist: create it with lines from "
                          f"`python -m serve --new-api-key NAME`")
    keys = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, digest = line.partition(":")
        if not sep:
            raise ConfigError(f"{path}:{number}: expected 'name:sha256', got {line[:40]!r}")
        try:
            keys.append(ApiKey(name=name.strip(), sha256=digest.strip().lower()))
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
    return keys


class GatewaySpec(GatewayLimits):
    """Everything one gateway worker needs: the configured ``serve.gateway`` limits, where it listens, the
    Triton it forwards to, and the API keys (:meth:`from_settings` builds it from the run's config)."""

    host: str = Field("127.0.0.1", description="bind address; beyond loopback API keys are required")
    port: int = Field(8080, ge=0, le=65535)
    triton_url: str = Field("http://127.0.0.1:8000", description="Triton's HTTP endpoint (KServe v2)")
    grpc_port: int = Field(0, ge=0, le=65535, description="KServe v2 over gRPC; 0 (off) unless given: "
                           ":meth:`from_settings` takes serve.gateway.grpc_port (8081 by default)")
    triton_grpc_url: str = Field("127.0.0.1:8001", description="Triton's gRPC endpoint, host:port")
    repository: Path | None = Field(None, description="repository stage directory holding task.json")
    api_keys: list[ApiKey] = Field(default_factory=list)
    watts_per_core: float = Field(10.0, gt=0, description="basis of the estimated J/request metric")

    @classmethod
    def from_settings(cls, settings: Settings, **values) -> Self:
        """``serve.host``, ``serve.gateway_port``, ``serve.gateway`` (keys read from its ``api_keys_file`` unless
        ``values`` gives ``api_keys``) and ``measure.watts_per_core``; ``values`` on top."""
        limits = settings.serve.gateway
        if "api_keys" not in values:
            values["api_keys"] = read_key_file(limits.api_keys_file) if limits.api_keys_file else []
        return cls(**{"host": settings.serve.host, "port": settings.serve.gateway_port,
                      "watts_per_core": settings.measure.watts_per_core, **limits.model_dump(), **values})

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> GatewaySpec:
        if not is_loopback(self.host) and not self.api_keys:
            raise ValueError(f"gateway host {self.host!r} is reachable beyond this machine, so API keys are "
                             f"required: set serve.gateway.api_keys_file (--api-keys-file), lines from `python -m "
                             f"serve --new-api-key NAME`, or bind 127.0.0.1")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"the gateway's HTTP and gRPC ports are both {self.port}: set serve.gateway.grpc_port "
                             f"to another port (0 turns gRPC off)")
        if "://" in self.triton_grpc_url or not self.triton_grpc_url.rpartition(":")[2].isdigit():
            raise ValueError(f"triton_grpc_url={self.triton_grpc_url!r} must be host:port (Triton's gRPC endpoint)")
        if not self.triton_url.startswith("http://"):
            raise ValueError(f"triton_url={self.triton_url!r} must be http://host:port (Triton's HTTP endpoint)")
        return self
