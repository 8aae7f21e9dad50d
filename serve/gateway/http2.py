"""The few HTTP/2 pieces the gRPC relay reads and writes itself: frames and gRPC status trailers.

The relay forwards almost every frame byte for byte; it writes only header blocks (a request's without
its API key, a response's re-encoded, see :mod:`serve.gateway.header_blocks`) and its own answers.
"""

from __future__ import annotations

from urllib.parse import quote

from serve.gateway.header_blocks import encode

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, CANCEL, COMPRESSION_ERROR, REFUSED_STREAM = 0x0, 0x1, 0x8, 0x9, 0x7
HEADER_TABLE_SIZE = 0x1
MAX_FRAME = 16384  # every peer accepts frames this large (the protocol's minimum SETTINGS_MAX_FRAME_SIZE)

_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # grpc-message: printable ASCII stays, the rest is %-encoded


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: 9-byte header (length, type, flags, stream) then ``payload``."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def frames(buf: bytearray, pos: int = 0) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """The complete frames in ``buf`` from ``pos``: (type, flags, stream id, start, end) each, the
    payload being ``buf[start + 9:end]``; and where the first incomplete one begins."""
    out, size = [], len(buf)
    while size - pos >= 9:
        end = pos + 9 + int.from_bytes(buf[pos:pos + 3], "big")
        if end > size:
            break
        out.append((buf[pos + 3], buf[pos + 4], int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF, pos, end))
        pos = end
    return out, pos


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def goaway(last_stream_id: int, code: int = NO_ERROR) -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big"))


def unpadded(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (and a HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    return payload[start:end]


def settings(payload: bytes) -> dict[int, int]:
    """A SETTINGS frame's identifier → value pairs."""
    return {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
            for i in range(0, len(payload) - 5, 6)}


def headers_frames(stream_id: int, block: bytes, end_stream: bool) -> bytes:
    """HEADERS (+ CONTINUATION) frames carrying ``block``."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= MAX_FRAME:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    chunks = [block[i:i + MAX_FRAME] for i in range(0, len(block), MAX_FRAME)]
    out = [frame(HEADERS, flags, stream_id, chunks[0])]
    out += [frame(CONTINUATION, 0, stream_id, chunk) for chunk in chunks[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, chunks[-1]))
    return b"".join(out)


def grpc_status(stream_id: int, code: int, message: str, replied: bool) -> bytes:
    """The frames ending a gRPC call with ``code``: trailers-only when no response headers went out yet."""
    fields = [] if replied else [(b":status", b"200"), (b"content-type", b"application/grpc")]
    fields += [(b"grpc-status", str(int(code)).encode()), (b"grpc-message", quote(message, safe=_SAFE).encode())]
    return headers_frames(stream_id, encode(fields), end_stream=True)


def grpc_timeout(value: bytes) -> float | None:
    """A ``grpc-timeout`` header (``<digits><unit>``) in seconds; None when absent or malformed."""
    unit = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}.get(value[-1:])
    return float(value[:-1]) * unit if unit and value[:-1].isdigit() else None
