"""The gRPC relay's data path: one client connection ⇄ one Triton connection, HTTP/2 frame by frame.

Why not grpcio: its Python stack (a server call plus a client call per request) cost the gateway
≈550 µs of CPU per request; this relay costs a frame parse and three small header blocks (≈70–120 µs
on 2 shared cores). Streams keep their ids on both connections, so DATA, WINDOW_UPDATE, PING, SETTINGS
and GOAWAY frames pass byte for byte and flow control and settings stay the peers' own, end to end. With a
routing file (a canary split), inference messages get the version the split picks written in, so DATA is
re-framed and the relay keeps the flow-control books in between (:mod:`serve.gateway.grpc_versions`).
Header blocks are decoded (each side's HPACK state followed) and re-written without dynamic-table
state (:mod:`serve.gateway.header_blocks`): requests lose their ``authorization`` (and, with tracing on,
carry the gateway's ``traceparent`` in place of the caller's), responses' trailers give the metrics their status.

The gateway answers a call itself (a refusal, a timeout, a message above the cap, Triton unreachable)
with trailers-only HEADERS and an RST_STREAM; whatever DATA then arrives for that stream is dropped
and its bytes handed back with a connection WINDOW_UPDATE, so the shared window never stalls.
"""

from __future__ import annotations

import asyncio

from serve.gateway import http2 as h2
from serve.gateway.grpc_proxy import Answer, Call, Code, KServeProxy
from serve.gateway.grpc_versions import MessageRouter, Windows
from serve.gateway.header_blocks import Decoder, HeaderBlockError, encode


class ClientSide(asyncio.Protocol):
    """One client connection, the Triton connection opened for it, and the calls open on them."""

    def __init__(self, proxy: KServeProxy, upstream: tuple[str, int], connections: set):
        self.proxy, self.address, self.connections = proxy, upstream, connections
        self.calls: dict[int, Call] = {}
        self.requests, self.responses = Decoder(), Decoder()  # the client's and Triton's blocks
        self.inbound, self.outbound = bytearray(), bytearray()
        self.blocks: dict[bool, tuple[int, int, bytearray]] = {}  # a header block awaiting CONTINUATION, per side
        self.transport = self.upstream = None
        self.preface, self.standalone, self.closed, self.last_stream, self.client = True, "", False, 0, ""
        # with a routing file, DATA is re-framed (a version written into inference messages) and the windows kept;
        # without one, frames pass byte for byte
        self.flow = Windows(self._credit_client) if proxy.gw.routing.path is not None else None

    # ---- connections -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.connections.add(self)
        if self.proxy.by_peer:
            self.client = (transport.get_extra_info("peername") or ("",))[0]
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: UpstreamSide(self), *self.address),
                                   self.proxy.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            if self.closed:
                return
            self.standalone = f"Triton's gRPC port {self.address[0]}:{self.address[1]} cannot be reached " \
                              f"({exc or 'timeout'})"
            self.transport.write(h2.frame(h2.SETTINGS, 0, 0))  # the server preface, answering by itself
        if not self.closed:
            self._from_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connections.discard(self)
        self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.close()
        for call in self.calls.values():
            self.proxy.finish(call, Code.CANCELLED, upstream=False)
        self.calls.clear()

    def upstream_lost(self) -> None:
        """Triton's connection closed: its open calls are UNAVAILABLE; the client reconnects for new ones."""
        self.upstream = None
        if self.closed:
            return
        for stream_id in list(self.calls):
            self._end(stream_id, Code.UNAVAILABLE, "Triton's gRPC connection closed", upstream=True)
        self.close()

    def drain(self) -> None:
        """No new calls on this connection (the gateway is stopping); open ones go on."""
        if not self.closed:
            self.transport.write(h2.goaway(self.last_stream))

    def close(self) -> None:
        if not self.closed:
            self.transport.write(h2.goaway(self.last_stream))
            self.transport.close()

    # ---- client → Triton ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.inbound += data
        if self.upstream is not None or self.standalone:
            self._from_client()

    def _from_client(self) -> None:
        buf, pos, out = self.inbound, 0, []
        if self.preface:
            if len(buf) < 24:
                return
            if buf[:24] != h2.PREFACE:
                return self.close()
            out.append(h2.PREFACE)
            pos, self.preface = 24, False
        frames, done = h2.frames(buf, pos)
        for kind, flags, stream_id, pos, end in frames:
            if kind == h2.DATA:
                call = self.calls.get(stream_id)
                if call is None:
                    self._credit(self.transport, end - pos - 9)
                elif self.flow is not None:
                    self._routed_data(stream_id, call, flags, buf[pos:end], out)
                elif call.oversized(h2.unpadded(flags, buf[pos + 9:end]), self.proxy.max_message):
                    self._end(stream_id, Code.RESOURCE_EXHAUSTED, self.proxy.too_large(call.need), False, out)
                    self._credit(self.transport, end - pos - 9)
                else:
                    call.client_ended = bool(flags & h2.END_STREAM)
                    out.append(bytes(buf[pos:end]))
            elif kind in (h2.HEADERS, h2.CONTINUATION):
                block = self._block(False, kind, flags, stream_id, buf[pos + 9:end])
                if block is not None:
                    self._request_headers(stream_id, block[0], block[1], out)
            elif stream_id == 0:
                if self.standalone:
                    self._answer_connection(kind, flags, buf[pos + 9:end])
                else:
                    if kind == h2.SETTINGS and not flags & h2.ACK:
                        self._table_size(self.responses, buf[pos + 9:end])
                    out.append(bytes(buf[pos:end]))
            elif kind == h2.RST_STREAM:
                call = self.calls.pop(stream_id, None)
                if call is not None:
                    out.append(bytes(buf[pos:end]))
                    self.proxy.finish(call, Code.CANCELLED, upstream=False)
            elif kind == h2.WINDOW_UPDATE and stream_id in self.calls:
                out.append(bytes(buf[pos:end]))
            # PRIORITY, PUSH_PROMISE, unknown types and frames of finished calls: dropped
        del buf[:done]
        if out and self.upstream is not None:
            self.upstream.write(b"".join(out))

    def _request_headers(self, stream_id: int, flags: int, block: bytes, out: list) -> None:
        try:
            fields = self.requests.decode(block)
        except HeaderBlockError:
            self.transport.write(h2.goaway(self.last_stream, h2.COMPRESSION_ERROR))
            return self.close()
        end_stream = bool(flags & h2.END_STREAM)
        if stream_id in self.calls:  # trailers of a client's stream
            out.append(h2.headers_frames(stream_id, encode(fields), end_stream))
            return
        if stream_id <= self.last_stream:
            return  # a call the gateway has answered already
        self.last_stream = stream_id
        path = authorization = timeout = None
        forward = []
        for name, value in fields:
            if name == b"authorization":
                authorization = value
                continue
            if name == b":path":
                path = value
            elif name == b"grpc-timeout":
                timeout = value
            forward.append((name, value))
        tracing = self.proxy.tracing
        try:
            call = self.proxy.open(path, authorization, self.client)
        except Answer as answer:
            if answer.call is not None:
                if tracing is not None:  # answered here: a SERVER span only
                    answer.call.spans, _ = tracing.grpc_start(answer.call.route, forward, None)
                self.proxy.finish(answer.call, answer.code, upstream=False)
            self._reply(stream_id, answer.code, answer.message, False, end_stream)
            return self.close() if self.standalone else None
        if tracing is not None:  # the caller's trace context replaced by the CLIENT span's
            call.spans, forward = tracing.grpc_start(call.route, forward, self.address)
        if self.standalone:
            self.proxy.finish(call, Code.UNAVAILABLE, upstream=True)
            self._reply(stream_id, Code.UNAVAILABLE, self.standalone, False, end_stream)
            return self.close()
        call.client_ended = end_stream
        self.calls[stream_id] = call
        if self.flow is not None:
            call.window = self.flow.initial
            if self.proxy.routes(call):
                client = call.caller or next((v for n, v in fields if n == self.proxy.gw.routing.client_header), None)
                call.router = MessageRouter(self.proxy.gw.routing, client, self.proxy.max_message)
        delay = self.proxy.deadline(call, timeout and h2.grpc_timeout(timeout))
        if delay is not None:
            call.timer = asyncio.get_running_loop().call_later(delay, self._expire, stream_id)
        out.append(h2.headers_frames(stream_id, encode(forward), end_stream))

    def _answer_connection(self, kind: int, flags: int, payload: bytes) -> None:
        """Connection frames while Triton cannot be reached: the relay acknowledges as a server would."""
        if kind in (h2.SETTINGS, h2.PING) and not flags & h2.ACK:
            self.transport.write(h2.frame(kind, h2.ACK, 0, b"" if kind == h2.SETTINGS else bytes(payload)))

    # ---- Triton → client ---------------------------------------------------------------------------
    def from_upstream(self, data: bytes) -> None:
        buf, out, credited = self.outbound, [], False
        buf += data
        frames, done = h2.frames(buf)
        for kind, flags, stream_id, pos, end in frames:
            if kind == h2.DATA:
                if stream_id in self.calls:
                    out.append(bytes(buf[pos:end]))
                else:
                    self._credit(self.upstream, end - pos - 9)
            elif kind in (h2.HEADERS, h2.CONTINUATION):
                block = self._block(True, kind, flags, stream_id, buf[pos + 9:end])
                if block is not None:
                    self._response_headers(stream_id, block[0], block[1], out)
            elif self.flow is not None and kind == h2.WINDOW_UPDATE and (stream_id == 0 or stream_id in self.calls):
                got = int.from_bytes(buf[pos + 9:end], "big") & 0x7FFFFFFF
                increment = self.flow.credited(stream_id, self.calls.get(stream_id), got)
                if increment:
                    out.append(bytes(buf[pos:end]) if increment == got else h2.window_update(stream_id, increment))
                credited = True
            elif stream_id == 0:
                if kind == h2.SETTINGS and not flags & h2.ACK:
                    self._table_size(self.requests, buf[pos + 9:end])
                    if self.flow is not None:
                        self.flow.settings(bytes(buf[pos + 9:end]), self.calls.values())
                        credited = True
                out.append(bytes(buf[pos:end]))
            elif kind == h2.RST_STREAM:
                call = self.calls.pop(stream_id, None)
                out.append(bytes(buf[pos:end]))
                if call is not None:
                    code = int.from_bytes(buf[pos + 9:end], "big")
                    self.proxy.finish(call, Code.CANCELLED if code == h2.CANCEL else Code.UNAVAILABLE
                                      if code == h2.REFUSED_STREAM else Code.INTERNAL, upstream=True)
            elif kind == h2.WINDOW_UPDATE and stream_id in self.calls:
                out.append(bytes(buf[pos:end]))
        del buf[:done]
        if out and not self.closed:
            self.transport.write(b"".join(out))
        if credited and self.flow.queue and self.upstream is not None:  # queued DATA that fits now
            sent = []
            self.flow.flush(sent, self.calls)
            if sent:
                self.upstream.write(b"".join(sent))

    def _response_headers(self, stream_id: int, flags: int, block: bytes, out: list) -> None:
        try:
            fields = self.responses.decode(block)
        except HeaderBlockError:
            return self.upstream.close()  # → upstream_lost: the calls become UNAVAILABLE
        call = self.calls.get(stream_id)
        if call is None:
            return  # the gateway answered this call already; the block only kept the decoder in step
        end_stream = bool(flags & h2.END_STREAM)
        out.append(h2.headers_frames(stream_id, encode(fields), end_stream))
        call.replied = True
        if end_stream:
            del self.calls[stream_id]
            status = next((value for name, value in fields if name == b"grpc-status"), b"2")
            self.proxy.finish(call, int(status) if status.isdigit() else Code.UNKNOWN, upstream=True)

    # ---- answering calls ---------------------------------------------------------------------------
    def _expire(self, stream_id: int) -> None:
        if stream_id in self.calls:
            self._end(stream_id, Code.DEADLINE_EXCEEDED, self.proxy.timed_out(), upstream=True)

    def _end(self, stream_id: int, code: Code, message: str, upstream: bool, out: list | None = None) -> None:
        """The gateway ends a relayed call itself: Triton's side cancelled (in ``out``'s order when
        given), the client answered."""
        call = self.calls.pop(stream_id)
        if out is not None:
            out.append(h2.rst_stream(stream_id, h2.CANCEL))
        elif self.upstream is not None:
            self.upstream.write(h2.rst_stream(stream_id, h2.CANCEL))
        self.proxy.finish(call, code, upstream)
        self._reply(stream_id, code, message, call.replied, call.client_ended)

    def _reply(self, stream_id: int, code: Code, message: str, replied: bool, client_ended: bool) -> None:
        if not self.closed:
            rst = b"" if client_ended else h2.rst_stream(stream_id, h2.NO_ERROR)  # stop sending: no one reads
            self.transport.write(h2.grpc_status(stream_id, code, message, replied) + rst)

    # ---- with a routing file ---------------------------------------------------------------------
    def _routed_data(self, stream_id: int, call: Call, flags: int, frame: bytearray, out: list) -> None:
        """A client's DATA frame counted against Triton's windows: as it came where it fits and no message of it
        is rewritten; else re-framed, its messages' versions written in (inference calls while versions move),
        padding dropped, the difference in length kept on the books (:class:`~serve.gateway.grpc_versions.Windows`)."""
        data, end, length = h2.unpadded(flags, frame[9:]), bool(flags & h2.END_STREAM), len(frame) - 9
        if call.router is not None:
            payload = call.router.feed(data, end)
            size = call.router.size
        else:
            payload = None if call.oversized(data, self.proxy.max_message) else data
            size = call.need
        if payload is None:
            self._end(stream_id, Code.RESOURCE_EXHAUSTED, self.proxy.too_large(size), False, out)
            self._credit(self.transport, length)
            return
        call.client_ended = end
        if call.router is None and self.flow.passes(call, length):
            out.append(bytes(frame))
            return
        self.flow.owe(stream_id, call, len(payload) - length)
        self.flow.send(stream_id, call, end, bytes(payload), out, self.calls)

    def _credit_client(self, stream_id: int, increment: int) -> None:
        if not self.closed:
            self.transport.write(h2.window_update(stream_id, increment))

    # ---- frame helpers -----------------------------------------------------------------------------
    def _block(self, side: bool, kind: int, flags: int, stream_id: int, payload) -> tuple[int, bytes] | None:
        """A complete header block (HEADERS flags, bytes) once its END_HEADERS frame has arrived."""
        if kind == h2.HEADERS:
            if flags & h2.END_HEADERS:
                return flags, bytes(h2.unpadded(flags, payload))
            self.blocks[side] = (stream_id, flags, bytearray(h2.unpadded(flags, payload)))
            return None
        started = self.blocks.get(side)
        if started is None or started[0] != stream_id:
            return None
        started[2].extend(payload)
        if flags & h2.END_HEADERS:
            del self.blocks[side]
            return started[1], bytes(started[2])
        return None

    @staticmethod
    def _credit(transport, length: int) -> None:
        """Hand back the connection window of DATA the relay dropped (the peer would never see it)."""
        if length and transport is not None:
            transport.write(h2.window_update(0, length))

    @staticmethod
    def _table_size(decoder: Decoder, payload: bytes) -> None:
        size = h2.settings(bytes(payload)).get(h2.HEADER_TABLE_SIZE)
        if size is not None:
            decoder.allowed = size


class UpstreamSide(asyncio.Protocol):
    """The Triton connection of one client connection: everything it hears goes to the client side."""

    def __init__(self, client: ClientSide):
        self.client = client

    def connection_made(self, transport: asyncio.Transport) -> None:
        if self.client.closed:
            transport.close()
        else:
            self.client.upstream = transport

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()
