"""HPACK header blocks (RFC 7541) for the gRPC relay: a lean decoder per peer, a stateless encoder.

The decoder follows one peer's encoder (its dynamic table, size updates, Huffman strings through the
``hpack`` package's table). It is ours rather than ``hpack.Decoder`` because the relay decodes three
blocks per call and that decoder's validation and bookkeeping cost ≈15 µs per field, most of the
relay's CPU. The encoder writes blocks that use no dynamic table at all (static-table indexes and
literals "without indexing", no Huffman), so they change no decoder's state: the relay can add, drop
or rewrite any block on either side without the peers' tables drifting apart, and keeps no encoder
state per direction.
"""

from __future__ import annotations

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE
_EXACT = {field: index for index, field in enumerate(STATIC, 1)}
_NAMES: dict[bytes, int] = {}
for _index, (_name, _) in enumerate(STATIC, 1):
    _NAMES.setdefault(_name, _index)


class HeaderBlockError(ValueError):
    """A header block that does not decode: the connection's compression state is lost."""


def _read_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value, pos = data[pos] & mask, pos + 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        byte, pos = data[pos], pos + 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, pos


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    huffman = data[pos] & 128
    length, pos = _read_integer(data, pos, 7)
    if pos + length > len(data):
        raise HeaderBlockError("a string runs past the end of its header block")
    raw = data[pos:pos + length]
    return (decode_huffman(raw) if huffman else raw), pos + length


class Decoder:
    """The header fields of one peer's blocks, in order, as (name, value) bytes."""

    def __init__(self):
        self.table: list[tuple[bytes, bytes]] = []  # newest first
        self.size, self.max_size, self.allowed = 0, 4096, 4096  # allowed: the other side's SETTINGS

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self._decode(data)
        except (IndexError, ValueError) as exc:
            raise HeaderBlockError(str(exc)) from None

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out, pos, size = [], 0, len(data)
        while pos < size:
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _read_integer(data, pos, 7)
                out.append(self._field(index))
                continue
            if byte & 0xC0 == 0x40:  # literal with incremental indexing
                index, pos = _read_integer(data, pos, 6)
            elif byte & 0xE0 == 0x20:  # dynamic table size update
                self.max_size, pos = _read_integer(data, pos, 5)
                if self.max_size > self.allowed:
                    raise HeaderBlockError(f"table size {self.max_size} above the allowed {self.allowed}")
                self._evict()
                continue
            else:  # literal without indexing, or never indexed
                index, pos = _read_integer(data, pos, 4)
            if index:
                name = self._field(index)[0]
            else:
                name, pos = _read_string(data, pos)
            value, pos = _read_string(data, pos)
            out.append((name, value))
            if byte & 0xC0 == 0x40:
                self.table.insert(0, (name, value))
                self.size += len(name) + len(value) + 32
                self._evict()
        return out

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(STATIC):
            return STATIC[index - 1]
        if index <= 0:
            raise HeaderBlockError("index 0")
        return self.table[index - len(STATIC) - 1]

    def _evict(self) -> None:
        while self.size > self.max_size:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer: ``first`` holds the representation's bits above the ``prefix_bits`` prefix."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((first | value,))
    out, value = bytearray((first | top,)), value - top
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


_ENCODED: dict[tuple[bytes, bytes], bytes] = {}  # most fields repeat call after call (path, agent, types)


def _encode_field(name: bytes, value: bytes) -> bytes:
    index = _EXACT.get((name, value))
    if index:
        return _integer(index, 7, 0x80)  # indexed field (static table)
    index = _NAMES.get(name)
    head = _integer(index, 4, 0x00) if index else b"\x00" + _integer(len(name), 7, 0) + name
    return head + _integer(len(value), 7, 0) + value  # literal without indexing, no Huffman


def encode(headers) -> bytes:
    """A header block for ``headers`` ((name, value) bytes pairs) that leaves every dynamic table alone."""
    out = []
    for field in headers:
        piece = _ENCODED.get(field)
        if piece is None:
            if len(_ENCODED) >= 4096:  # bounded: per-call values (grpc-timeout) must not pile up
                _ENCODED.clear()
            piece = _ENCODED[field] = _encode_field(*field)
        out.append(piece)
    return b"".join(out)
