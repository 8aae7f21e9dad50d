"""Which version of a model a request goes to: the stable one, or a canary for ``weight`` percent of requests.

The release commands (:mod:`serve.release`) write the routing file (``serve/routing.json`` of the run)::

    {"generation": 3, "weight": 10.0, "models": {"digits-fp32": {"stable": 2, "canary": 3}}, ...}

and every gateway worker re-reads it when it changes (a ``stat`` at most every :data:`POLL_S`), so one write
switches the whole gateway, however many workers it has. A request for a model the file names is addressed to
Triton as ``/v2/models/<model>/versions/<v>/infer`` (a gRPC message gets ``model_version``, see
:mod:`serve.gateway.grpc_versions`): with a canary loaded, Triton itself would send unversioned requests to the
highest version. Without a routing file requests go out unversioned, as before.

The split is sticky per client where a client is known (its API key, else the ``client_header``): the client's
hash picks the same version on every worker and every request. Other requests pick at random.

Versions are *moving* while a canary is on or while the release commands switch versions (``"settling": true``
in the file, from before a new version loads until the old one has unloaded): only then may Triton hold more
than one version of a model. The gRPC relay reads messages to write their version only then; at other times
Triton holds exactly the stable version and messages pass as they came.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoglm.artifacts import write_atomic

log = logging.getLogger("serve.gateway")
ROUTING_FILE = "routing.json"  # in the run's serve/ directory
POLL_S = 0.2  # how stale a worker's routing can be; the release commands wait a few of these before unloading
STABLE, CANARY, PINNED = "stable", "canary", "pinned"  # the role label of a request's version


@dataclass(frozen=True)
class Split:
    """One model's versions: requests whose draw is below ``weight`` (percent) go to ``canary``."""

    stable: int
    canary: int | None = None

    def pick(self, weight: float, client: bytes | None) -> tuple[int, str]:
        """(version, role) for one request from ``client`` (None: an unknown client, drawn at random)."""
        if self.canary is None:
            return self.stable, STABLE
        # crc32 spreads keys evenly over 0..2^32; a random draw where no client is known
        draw = (zlib.crc32(client) % 10_000) / 100 if client is not None else random.random() * 100
        return (self.canary, CANARY) if draw < weight else (self.stable, STABLE)


def write_routing(path: Path, models: dict[str, Split], weight: float, **extra) -> dict:
    """Write the routing file atomically (a worker never reads half of it); returns what was written."""
    old = read_routing(path)
    state = {**{k: v for k, v in old.items() if k not in ("models", "weight", "generation")}, **extra,
             "generation": old.get("generation", 0) + 1, "weight": weight,
             "models": {m: {"stable": s.stable, "canary": s.canary} for m, s in sorted(models.items())}}
    write_atomic(path, (json.dumps(state, indent=2) + "\n").encode())
    return state


def read_routing(path: Path | None) -> dict:
    """The routing file's content; {} where there is none."""
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def splits(state: dict) -> dict[str, Split]:
    return {m: Split(int(v["stable"]), None if v.get("canary") is None else int(v["canary"]))
            for m, v in state.get("models", {}).items()}


class Routing:
    """One worker's view of the routing file, refreshed when the file changes."""

    def __init__(self, path: Path | None, client_header: str = "x-client-id",
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.clock = (Path(path) if path else None), clock
        self.client_header = client_header.lower().encode()
        self.splits: dict[str, Split] = {}
        self.weight, self.moving = 0.0, False
        self.state: dict = {}
        self._checked, self._stamp = float("-inf"), None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed (its mtime and size); a file that cannot be read keeps the last
        routing, logged: traffic keeps flowing to versions that were loaded."""
        self._checked = self.clock()
        try:
            st = os.stat(self.path) if self.path else None
        except FileNotFoundError:
            st = None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
        if stamp == self._stamp:
            return
        try:
            state = read_routing(self.path) if st else {}
            self.splits, self.weight = splits(state), float(state.get("weight", 0.0))
            self.moving = self.moving_in(state)
            self.state, self._stamp = state, stamp
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.error("routing file %s cannot be read (%s): keeping the last routing", self.path, exc)

    def _split(self, model: str) -> Split | None:
        if self.path is None:
            return None
        if self.clock() - self._checked > POLL_S:
            self.refresh()
        return self.splits.get(model)

    def pick(self, model: str, client: bytes | None) -> tuple[int, str] | None:
        """(version, role) for a request to ``model``; None where the routing names no version for it."""
        split = self._split(model)
        return split.pick(self.weight, client) if split is not None else None

    @staticmethod
    def moving_in(state: dict) -> bool:
        """Whether the routing file's ``state`` has versions moving: a canary, or a switch under way."""
        return bool(state.get("settling")) or any(v.get("canary") is not None for v in state.get("models", {}).values())

    def versions_moving(self) -> bool:
        """Whether a model may have more than one version loaded now: a canary, or a switch under way."""
        if self.path is None:
            return False
        if self.clock() - self._checked > POLL_S:
            self.refresh()
        return self.moving

    def stable(self, model: str) -> int | None:
        """The stable version of ``model`` (None: no routing for it)."""
        split = self._split(model)
        return split.stable if split is not None else None
