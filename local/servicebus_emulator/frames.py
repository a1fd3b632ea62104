"""AMQP 1.0 framing: split a byte stream into frames and encode performatives, with the SDK's own codec."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from azure.servicebus._pyamqp import _decode, _encode

__all__ = ["AMQP_HEADER", "SASL_HEADER", "TLS_HEADER", "Frame", "FrameBuffer", "encode", "encode_sasl"]

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
TLS_HEADER = b"AMQP\x02\x01\x00\x00"
_FRAME_HEAD = struct.Struct(">IBBH")  # size, data offset (in 4-byte words), frame type, channel
_AMQP_FRAME, _SASL_FRAME = b"\x00", b"\x01"


class Frame(NamedTuple):
    channel: int
    code: int  # performative descriptor, e.g. 0x14 transfer; -1 for an empty (heartbeat) frame
    fields: list[Any]  # decoded fields, padded with defaults; a transfer's payload is the last item


class FrameBuffer:
    """Accumulates received bytes; yields the protocol header first, then complete frames."""

    def __init__(self, max_frame_size: int) -> None:
        self._buffer = bytearray()
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def header(self) -> bytes | None:
        if len(self._buffer) < 8:
            return None
        header = bytes(self._buffer[:8])
        del self._buffer[:8]
        return header

    def frames(self) -> Iterator[Frame]:
        buffer = self._buffer
        start = 0
        try:
            while len(buffer) - start >= 8:
                size, doff, _, channel = _FRAME_HEAD.unpack_from(buffer, start)
                if size > self.max_frame_size or size < 8 or doff < 2:
                    raise ValueError(f"invalid frame size {size}")
                if len(buffer) - start < size:
                    break
                body = bytes(buffer[start + doff * 4 : start + size])
                start += size
                if not body:
                    yield Frame(channel, -1, [])
                    continue
                code, fields = _decode.decode_frame(memoryview(body))
                yield Frame(channel, code, fields)
        finally:
            del buffer[:start]


def encode(channel: int, performative: Any) -> bytes:
    header, body = _encode.encode_frame(performative)
    assert body is not None
    return header + struct.pack(">H", channel) + bytes(body)


def encode_sasl(performative: Any) -> bytes:
    header, body = _encode.encode_frame(performative, frame_type=_SASL_FRAME)
    assert body is not None
    return header + b"\x00\x00" + bytes(body)


EMPTY_FRAME = struct.pack(">IBBH", 8, 2, 0, 0)


def make(cls: Any, **fields: Any) -> Any:
    """Build a performative namedtuple, leaving unnamed fields null (the SDK's tuples have no defaults)."""
    return cls(**{name: fields.get(name) for name in cls._fields})
