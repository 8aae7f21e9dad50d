"""The canary split on the gRPC relay: a version written into each inference message, flow control kept exact.

Triton sends a gRPC ``ModelInfer`` (or a ``ModelStreamInfer`` message) that names no ``model_version`` to the
highest version it has loaded: during a canary, the canary. So while versions move (a canary is on, or a release
switches versions: :meth:`~serve.gateway.canary.Routing.versions_moving`) and the routing file names the model,
the relay writes the version the split picked (sticky per client as on HTTP) into the request message as field 2
(``model_version``). It goes in at the start of the message: a protobuf parser keeps the last value of a string
field, so a client that names a version itself (anywhere) keeps it, and the message streams on without waiting
for its end; only its head (the gRPC prefix and the first :data:`HEAD_LIMIT` bytes, where ``model_name`` and any
``model_version`` sit) is held where a frame cuts it. Messages the relay cannot read (compressed ones, a head in
an unusual field order) pass unchanged, unversioned. While versions rest, Triton holds only the stable version
and frames pass as they came, only counted.

A rewritten message is longer than what the client sent, so a connection with a routing file keeps both sides'
windows from its start (:class:`Windows`): bytes the client sent are acknowledged to the client (Triton's
WINDOW_UPDATEs are passed on less the bytes the relay added; bytes it dropped are credited at once), and bytes
sent upstream count against Triton's connection and stream windows: DATA that does not fit waits for Triton's
next WINDOW_UPDATE.
"""

from __future__ import annotations

import random
from collections import deque

from serve.gateway import http2 as h2
from serve.gateway.canary import PINNED, Routing

MODEL_NAME, MODEL_VERSION = 0x0A, 0x12  # ModelInferRequest fields 1 and 2 (string: wire type 2)
HEAD_LIMIT = 1024  # a model name and version fit; a longer head is not read (the message passes unversioned)
DEFAULT_WINDOW = 65_535  # RFC 9113: every window starts here until SETTINGS or WINDOW_UPDATE say otherwise
INITIAL_WINDOW_SIZE = 0x4


def _varint(data, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when ``data`` ends inside it."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 127) << shift
        pos += 1
        if not byte & 128:
            return value, pos
        shift += 7
    return None


class MessageRouter:
    """One call's request messages, gRPC-framed across DATA frames, each given the version its model goes to."""

    __slots__ = ("routing", "client", "limit", "head", "left", "size", "seen")

    def __init__(self, routing: Routing, client: bytes | None, limit: int):
        # an unknown client draws once per call: a stream's messages stay on one version while the routing
        # stays, and follow it when a promote or rollback moves them (the old version is about to unload)
        self.routing, self.limit = routing, limit
        self.client = client if client is not None else random.getrandbits(64).to_bytes(8, "big")
        self.head, self.left, self.size = bytearray(), 0, 0  # left: bytes of the current message still to pass
        self.seen: set[tuple[str, int, str]] = set()  # (model, version, role) of the call's messages, for metrics

    def feed(self, data: bytes, end: bool) -> bytes | None:
        """The bytes to send upstream for ``data`` (a head cut across frames is held until it is whole; the
        stream's end flushes it as it is); None when a message is above ``limit`` bytes."""
        out, at, size = [], 0, len(data)
        while at < size:
            if self.left:  # the rest of a message whose head went out
                step = min(self.left, size - at)
                out.append(data[at:at + step])
                self.left -= step
                at += step
                continue
            if not self.head and size - at >= 5:  # a message starts here: the usual case, its head in this frame
                self.size = int.from_bytes(data[at + 1:at + 5], "big")
                whole = 5 + min(self.size, HEAD_LIMIT)
                if self.size > self.limit:
                    return None
                if size - at >= whole:
                    out.append(self._rewrite(data[at:at + whole]))
                    at += whole
                    continue
            take = 5 - len(self.head) if len(self.head) < 5 else 5 + min(self.size, HEAD_LIMIT) - len(self.head)
            self.head += data[at:at + take]
            at += take
            if len(self.head) >= 5:
                self.size = int.from_bytes(self.head[1:5], "big")
                if self.size > self.limit:
                    return None
                if len(self.head) == 5 + min(self.size, HEAD_LIMIT):
                    head, self.head = bytes(self.head), bytearray()
                    out.append(self._rewrite(head))
        if end and self.head:  # a message cut off by the stream's end: Triton sees what the client sent
            out.append(bytes(self.head))
            self.head.clear()
        return b"".join(out)

    def _rewrite(self, head: bytes) -> bytes:
        """A message's whole head (prefix and up to HEAD_LIMIT bytes) with the version field put in front."""
        size, have = self.size, len(head)
        name = version = None
        pos = 5
        while head[0] == 0 and pos < have and head[pos] in (MODEL_NAME, MODEL_VERSION):  # 0: not compressed
            short = head[pos + 1] if pos + 1 < have else 128
            length = (short, pos + 2) if short < 128 else _varint(head, pos + 1)  # names are short: one byte
            if length is None or length[1] + length[0] > have:
                break  # a field longer than the head read: not a model name
            value = bytes(head[length[1]:length[1] + length[0]])
            name, version = (value, version) if head[pos] == MODEL_NAME else (name, value)
            pos = length[1] + length[0]
        inserted = self._version(name, version)
        self.left = size - (have - 5)
        if not inserted:
            return bytes(head)
        return bytes(head[:1]) + (size + len(inserted)).to_bytes(4, "big") + inserted + bytes(head[5:])

    def _version(self, name: bytes | None, version: bytes | None) -> bytes:
        """The ``model_version`` field to insert (b"" for none), the message's version noted for the metrics."""
        if not name:
            return b""
        model = name.decode(errors="replace")
        if version:  # named by the client: kept ("pinned"), counted where it is a number
            if version.isdigit():
                self.seen.add((model, int(version), PINNED))
            return b""
        picked = self.routing.pick(model, self.client)
        if picked is None:
            return b""  # the routing names no version for this model: unversioned, as the client sent it
        self.seen.add((model, *picked))
        digits = str(picked[0]).encode()
        return bytes((MODEL_VERSION, len(digits))) + digits


class Windows:
    """Flow control of one client connection whose DATA the relay re-frames: Triton's windows as the relay sends
    against them, the credits Triton will send for bytes the relay added (``debt``), and DATA waiting for room."""

    def __init__(self, credit_client):
        self.window = self.initial = DEFAULT_WINDOW
        self.debt = 0
        self.queue: deque[list] = deque()  # [stream id, call, END_STREAM flag, payload] in arrival order
        self.credit_client = credit_client  # (stream id, increment): a WINDOW_UPDATE to the client

    def owe(self, stream_id: int, call, delta: int) -> None:
        """The relay sends ``delta`` more bytes upstream than the client sent (fewer when negative): more is
        taken back from Triton's coming credits; fewer is credited to the client now."""
        self.debt += delta
        if self.debt < 0:
            self.credit_client(0, -self.debt)
            self.debt = 0
        if call is None:  # a stream that ended: its window is gone with it
            return
        call.debt += delta
        if call.debt < 0:
            if not call.client_ended:
                self.credit_client(stream_id, -call.debt)
            call.debt = 0

    def credited(self, stream_id: int, call, increment: int) -> int:
        """Triton's WINDOW_UPDATE of ``increment`` (stream 0: the connection's): the part the client gets."""
        holder = self if stream_id == 0 else call
        holder.window += increment
        taken = min(increment, holder.debt)
        holder.debt -= taken
        return increment - taken

    def settings(self, payload: bytes, calls) -> None:
        """Triton's SETTINGS: a new initial stream window moves every open stream's window by the difference."""
        size = h2.settings(payload).get(INITIAL_WINDOW_SIZE)
        if size is not None:
            for call in calls:
                call.window += size - self.initial
            self.initial = size

    def passes(self, call, length: int) -> bool:
        """Whether a frame of ``length`` flow-controlled bytes may go as it came (nothing queued, it fits): then
        it is counted against both windows."""
        if self.queue or length > self.window or length > call.window:
            return False
        self.window -= length
        call.window -= length
        return True

    def send(self, stream_id: int, call, end: bool, payload: bytes, out: list, calls: dict) -> None:
        """DATA for Triton: into ``out`` as far as the windows allow, the rest queued in order."""
        if not self.queue and (not payload or len(payload) <= min(self.window, call.window)):  # empty: no window
            self._emit(stream_id, call, end, payload, out)
        else:
            self.queue.append([stream_id, call, end, payload])
            self.flush(out, calls)

    def flush(self, out: list, calls: dict) -> None:
        """Queued DATA that now fits; a stream short of window waits without holding the others back.
        DATA of a call that ended meanwhile is dropped (Triton never credits it: the client is credited)."""
        waiting, blocked = deque(), set()
        for entry in self.queue:
            stream_id, call, end, payload = entry
            if calls.get(stream_id) is not call:
                self.owe(stream_id, None, -len(payload))
                continue
            if stream_id in blocked:
                waiting.append(entry)
                continue
            room = min(self.window, call.window)
            if not payload or room >= len(payload):
                self._emit(stream_id, call, end, payload, out)
                continue
            if room > 0:
                self._emit(stream_id, call, False, payload[:room], out)
                entry[3] = payload[room:]
            blocked.add(stream_id)
            waiting.append(entry)
        self.queue = waiting

    def _emit(self, stream_id: int, call, end: bool, payload: bytes, out: list) -> None:
        self.window -= len(payload)
        call.window -= len(payload)
        flags = h2.END_STREAM if end else 0
        if len(payload) <= h2.MAX_FRAME:
            out.append(h2.frame(h2.DATA, flags, stream_id, payload))
            return
        last = (len(payload) - 1) // h2.MAX_FRAME * h2.MAX_FRAME
        out.extend(h2.frame(h2.DATA, 0, stream_id, payload[i:i + h2.MAX_FRAME]) for i in range(0, last, h2.MAX_FRAME))
        out.append(h2.frame(h2.DATA, flags, stream_id, payload[last:]))
