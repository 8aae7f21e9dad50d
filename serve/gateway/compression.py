"""HTTP content codings on the v2 routes, as Triton's own HTTP server applies them.

Requests: a body sent with ``Content-Encoding: gzip`` or ``deflate`` (zlib, as tritonclient's
``request_compression_algorithm`` sends it) is inflated before the gateway validates it, and the
gateway's body limit applies to the *inflated* size: inflation stops one byte past the limit, so a
small body that inflates to gigabytes (a zip bomb) costs at most the limit in memory and is a 413.
Responses: ``Accept-Encoding`` is read with Triton's own rule (the first of gzip, deflate and
identity with the highest q-value wins) and only the chosen coding is asked of Triton, which
compresses inference replies itself; nothing else reaches Triton, whose replies would otherwise be
compressed for clients that never asked.
"""

from __future__ import annotations

import zlib

from serve.gateway.errors import BadInput, Refused

SUPPORTED = (b"gzip", b"deflate")
ACCEPTED = ((b"accept-encoding", b"gzip, deflate"),)  # sent with a 415, as Triton does
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def inflate(body: bytes, coding: bytes, limit: int, too_large: str) -> bytes:
    """``body`` decoded from ``coding``; Refused 415 for a coding other than gzip/deflate/identity,
    413 (``too_large``) past ``limit`` inflated bytes, 400 for a body that is not valid ``coding``."""
    coding = coding.strip().lower()
    if coding in (b"", b"identity"):
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise Refused(415, f"Content-Encoding {coding[:32].decode(errors='replace')!r} is not supported: send "
                           f"the body uncompressed or compressed with gzip or deflate", ACCEPTED)
    out, size, data = [], 0, body
    inflater = zlib.decompressobj(wbits)
    try:
        while True:
            # At most limit + 1 bytes out per call: a bomb stops here, having cost the limit in memory.
            part = inflater.decompress(data, limit - size + 1)
            size += len(part)
            if size > limit:
                raise Refused(413, f"{too_large} (the limit applies to the decompressed body)")
            out.append(part)
            data = inflater.unconsumed_tail
            if inflater.eof:
                if not inflater.unused_data:
                    return b"".join(out)
                if coding != b"gzip":
                    raise BadInput("the deflate body has bytes after its compressed stream: send one zlib stream")
                # gzip allows several members back to back (what `cat a.gz b.gz` makes): one inflater each
                data, inflater = inflater.unused_data, zlib.decompressobj(wbits)
            elif not data:
                raise BadInput(f"the {coding.decode()} body ends before its compressed stream does: send the "
                               f"whole body")
    except zlib.error as exc:
        raise BadInput(f"the body is not valid {coding.decode()} data ({exc}): compress it with "
                       f"{'gzip' if coding == b'gzip' else 'zlib (deflate)'} or send it uncompressed") from None


def response_coding(accept_encoding: bytes) -> bytes | None:
    """The coding Triton would answer ``Accept-Encoding: accept_encoding`` with: gzip, deflate or None
    (identity). Triton's rule: among gzip, deflate and identity the highest q-value wins, the first on
    ties; a malformed entry is skipped; ``q=0`` never wins."""
    best, weight = None, 0.0
    for entry in accept_encoding.split(b","):
        name, _, q = entry.strip().partition(b";")
        if q:
            key, _, value = q.strip().partition(b"=")
            try:
                if key.strip() != b"q":
                    continue
                entry_weight = float(value)
            except ValueError:
                continue
        else:
            entry_weight = 1.0
        name = name.strip().lower()
        if name in (b"gzip", b"deflate", b"identity") and entry_weight > weight:
            best, weight = name, entry_weight
    return None if best in (None, b"identity") else best
