"""Admission control: API keys, per-key token buckets, bounded in-flight requests, bounded bodies.

:meth:`Guard.admit` is the one admission of a request, called by the fast routes and, as a FastAPI
dependency, by the slow ones; :func:`limited` counts body bytes on the FastAPI routes and
:func:`read_body` on the fast ones.
Overload is refused at once (503 + Retry-After) instead of queued: a queue in front of a saturated
Triton only turns every request's latency into a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.gateway.buckets import buckets_for
from serve.gateway.errors import Refused
from serve.settings import GatewaySettings


@dataclass(frozen=True)
class Caller:
    """Who sent a request: an API key's name, or ``anonymous`` where keys are optional."""

    name: str


ANONYMOUS = Caller("anonymous")


class Guard:
    """The protection state of one gateway worker: its in-flight count is its own; its rate-limit buckets
    are the gateway's, shared with the other workers where ``settings.shared_dir`` is set."""

    def __init__(self, settings: GatewaySettings, clock: Callable[[], float] = time.monotonic):
        self.settings, self.clock = settings, clock
        self._keys = [(key.name, bytes.fromhex(key.sha256)) for key in settings.api_keys]
        self._buckets = (buckets_for(settings.rate_limit_rps, settings.rate_limit_burst, settings.shared_dir)
                         if settings.rate_limit_rps else None)
        self.in_flight = 0
        self._retry = ((b"retry-after", str(settings.retry_after_s).encode()),)
        self._too_large = (f"request body above the gateway's limit of {settings.max_body_bytes} bytes: send "
                           f"fewer items per request")

    # ---- who ---------------------------------------------------------------------------------------
    def authenticate(self, authorization: bytes | None) -> Caller:
        """The caller of a request from its Authorization header; Refused(401) if a key is needed."""
        if not self._keys:
            return ANONYMOUS
        challenge = ((b"www-authenticate", b'Bearer realm="autoglm"'),)
        if not authorization or not authorization[:7].lower() == b"bearer ":
            raise Refused(401, "missing API key: send 'Authorization: Bearer <key>'", challenge)
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        found = None
        for name, stored in self._keys:  # compare with every key: timing says nothing about which matched
            if hmac.compare_digest(digest, stored):
                found = name
        if found is None:
            raise Refused(401, "invalid API key", challenge)
        return Caller(found)

    def rate_limit(self, caller: Caller, client: str = "") -> None:
        """Refused(429) with Retry-After when ``caller`` exceeds ``rate_limit_rps``.

        Buckets are per API key; without keys, per client address; shared by the gateway's workers
        where it has a ``shared_dir`` (:mod:`serve.gateway.buckets`).
        """
        if self._buckets is None:
            return
        key = caller.name if caller is not ANONYMOUS else f"{caller.name}@{client}"
        wait = self._buckets.take(key, self.clock())
        if wait:
            raise Refused(429, f"rate limit of {self.settings.rate_limit_rps:g} requests/s for '{key}' exceeded",
                          ((b"retry-after", str(max(1, math.ceil(wait))).encode()),), shed="rate_limit")

    def check(self, authorization: bytes | None, client: str = "") -> Caller:
        """Authenticate, then rate-limit."""
        caller = self.authenticate(authorization)
        self.rate_limit(caller, client)
        return caller

    # ---- how many ----------------------------------------------------------------------------------
    def admit(self, authorization: bytes | None, client: str = "", content_length: bytes | None = None) -> Caller:
        """Let a request in, holding one in-flight slot until :meth:`release`; else Refused, checked in this
        order: its API key (401), its caller's rate (429), its declared size (413), a free slot (503 +
        Retry-After)."""
        caller = self.check(authorization, client)
        self.check_length(content_length)
        if self.in_flight >= self.settings.max_in_flight:
            raise Refused(503, f"the gateway is at its limit of {self.settings.max_in_flight} requests in "
                               f"flight; retry later", self._retry, shed="in_flight")
        self.in_flight += 1
        return caller

    def release(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        """Let go of the rate-limit buckets (the shared table's file stays for the other workers)."""
        if self._buckets is not None:
            self._buckets.close()

    # ---- how big -----------------------------------------------------------------------------------
    def check_length(self, content_length: bytes | None) -> None:
        """Refused(413) when a declared Content-Length is above ``max_body_bytes``."""
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise Refused(400, "Content-Length is not a number") from None
            if declared > self.settings.max_body_bytes:
                raise Refused(413, self.too_large())

    def too_large(self) -> str:
        """The 413 message."""
        return self._too_large


def limited(receive, limit: int, too_large: Callable[[], Exception]):
    """``receive`` counting the body's bytes as they arrive: past ``limit`` it raises ``too_large()``."""
    seen = 0

    async def counted():
        nonlocal seen
        event = await receive()
        seen += len(event.get("body", b""))
        if seen > limit:
            raise too_large()
        return event

    return counted


async def read_body(receive, limit: int, message: str, timeout_s: float) -> bytes:
    """The whole request body, counting bytes as they arrive: Refused(413) past ``limit``, Refused(408)
    when it has not all arrived within ``timeout_s`` (a stalled sender must not hold an in-flight slot:
    the server's own receive() waits forever).

    The fast routes' hot path: the count is inline and the deadline a bare timer that cancels this
    task, as ``asyncio.timeout`` does without its context object (≈5 µs of ≈11 per request measured).
    """
    task = asyncio.current_task()
    cancelling, expired = task.cancelling(), False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        chunks, seen = [], 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                raise Refused(499, "client disconnected")
            chunk = event.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise Refused(413, message)
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)  # one chunk: that very object, no copy
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:  # our deadline, not a cancellation from outside
            raise Refused(408, f"the request body did not arrive within {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
