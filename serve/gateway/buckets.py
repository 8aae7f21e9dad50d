"""Rate-limit token buckets: a worker's own, or one table shared by every worker of the gateway on a host.

uvicorn's ``--workers N`` are separate processes, each handed whichever connections it accepts: with a
bucket per worker a client gets up to N × ``rate_limit_rps``. :class:`SharedBuckets` keeps every
bucket in one small file under the gateway's ``shared_dir``, mapped into each worker and updated
under an exclusive ``flock``, so the limit holds for the gateway as a whole. A take costs ≈1.6 µs against
≈0.7 µs for a worker's own bucket (measured on a 2-core host; the two ``flock`` calls are ≈0.7 µs of
it). A per-host lock was chosen over giving each worker rate/N, which refuses a client whose
connections all land on one worker at 1/N of its rate. Gateways on other hosts (replicas, pods) still
count alone: see the README.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from pathlib import Path

BUCKETS_FILE = "rate_limit.buckets"  # in shared_dir; not *.db, which holds the metrics' files
SLOTS = 1 << 14  # buckets held at once (24 bytes each: 384 KiB); beyond it the least recent starts over full
PROBES = 8  # slots looked at per key (open addressing, linear probing)
MAX_LOCAL = 10_000  # a worker's own buckets: past this many (anonymous addresses) it starts over


class TokenBucket:
    """``rate`` tokens/s up to ``burst``; ``take`` returns 0 when allowed, else seconds until it would be."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, float(burst), float(burst), now

    def take(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class LocalBuckets:
    """One worker's buckets, by key: the gateway's own when it runs a single worker."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_LOCAL:  # many anonymous addresses: start over rather than grow forever
                self._buckets.clear()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def close(self) -> None:
        pass


class SharedBuckets:
    """Every worker's buckets in one file-backed table: slot = (key hash, tokens, stamp), taken under ``flock``.

    ``now`` is ``time.monotonic()``, one clock for every process of a host. A slot whose bucket has been
    idle for ``burst / rate`` seconds holds a full bucket, as a new one would: it is free for another key,
    so the table never needs clearing. Not for a network filesystem: ``shared_dir`` is local to the host.
    """

    def __init__(self, path: Path, rate: float, burst: int):
        self.rate, self.burst, self.idle_s = rate, float(burst), burst / rate
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOTS * 24
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # the first worker sizes it; zeros are an empty table
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._map = mmap.mmap(self._fd, size)
        view = memoryview(self._map)
        self._ids, self._floats = view.cast("Q"), view.cast("d")  # slot i: ids[3i], floats[3i + 1], floats[3i + 2]
        self._hashes: dict[str, int] = {}

    def _hash(self, key: str) -> int:
        """A stable, non-zero 64-bit id of ``key`` (Python's own hash differs between processes)."""
        found = self._hashes.get(key)
        if found is None:
            if len(self._hashes) >= MAX_LOCAL:
                self._hashes.clear()
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            found = self._hashes[key] = int.from_bytes(digest, "little") | 1
        return found

    def take(self, key: str, now: float) -> float:
        """As :meth:`TokenBucket.take`, on the bucket every worker sees for ``key``."""
        ident, ids, floats = self._hash(key), self._ids, self._floats
        start = ident & (SLOTS - 1)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            slot, free = -1, -1
            for probe in range(start, start + PROBES):
                at = probe & (SLOTS - 1)
                held = ids[3 * at]
                if held == ident:
                    slot = at
                    break
                if held == 0:  # the end of this key's chain: slots are never emptied, so it is not further on
                    free = at if free < 0 else free
                    break
                if free < 0 and now - floats[3 * at + 2] >= self.idle_s:
                    free = at
            if slot < 0:  # a new bucket, full: in a free slot, else the least recent of the window
                slot = free if free >= 0 else min(((probe & (SLOTS - 1)) for probe in range(start, start + PROBES)),
                                                  key=lambda at: floats[3 * at + 2])
                ids[3 * slot], floats[3 * slot + 1], floats[3 * slot + 2] = ident, self.burst, now
            tokens, stamp = floats[3 * slot + 1], floats[3 * slot + 2]
            if now > stamp:  # another worker may have stamped a later `now` before this one got the lock
                tokens = min(self.burst, tokens + (now - stamp) * self.rate)
                floats[3 * slot + 2] = now
            if tokens >= 1:
                floats[3 * slot + 1] = tokens - 1
                return 0.0
            floats[3 * slot + 1] = tokens
            return (1 - tokens) / self.rate
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._ids.release()
        self._floats.release()
        self._map.close()
        os.close(self._fd)


def buckets_for(rate: float, burst: int, shared_dir: Path | None) -> LocalBuckets | SharedBuckets:
    """The gateway's buckets: shared by its workers through ``shared_dir``, else this worker's own."""
    if shared_dir is None:
        return LocalBuckets(rate, burst)
    return SharedBuckets(Path(shared_dir) / BUCKETS_FILE, rate, burst)
