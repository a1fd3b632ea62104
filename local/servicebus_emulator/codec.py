"""Message sections on the wire: split a sender's encoded message, rebuild the one we deliver.

The SDK's own codec (``azure.servicebus._pyamqp``) decodes and encodes every value; this module only cuts the
encoded message at section boundaries. Sections the broker never changes (properties, application properties,
body, footer) are kept byte for byte, because decoding loses AMQP types (string, symbol and binary all decode to
``bytes``) and re-encoding would change what the receiver sees. The sender's header fields (durable, priority,
ttl, first-acquirer) and its delivery and message annotations are kept too; the broker sets the header's
delivery-count, adds its own annotations (``x-opt-lock-token`` to the delivery annotations of a locked message,
``x-opt-sequence-number``, ``x-opt-enqueued-time``, ``x-opt-locked-until`` and ``x-opt-message-state`` to the
message annotations), and splices DeadLetterReason / DeadLetterErrorDescription into the application properties
when it dead-letters a message.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any

from azure.servicebus._pyamqp import _decode, _encode
from azure.servicebus._pyamqp.message import Header
from azure.servicebus._pyamqp.types import AMQPTypes

__all__ = ["MessageParts", "add_application_properties", "build_message", "split_message"]

_DECODERS = _decode._DECODE_BY_CONSTRUCTOR
_HEADER, _DELIVERY_ANN, _MESSAGE_ANN, _PROPERTIES, _APP_PROPERTIES = 0x70, 0x71, 0x72, 0x73, 0x74
_MAP32 = struct.Struct(">BII")  # constructor, size, count
_BROKER_ANNOTATIONS = (b"x-opt-sequence-number", b"x-opt-enqueued-time", b"x-opt-locked-until", b"x-opt-message-state")
_BROKER_DELIVERY_ANNOTATIONS = (b"x-opt-lock-token",)
_TYPE, _VALUE = "TYPE", "VALUE"


@dataclass(frozen=True)
class MessageParts:
    """An encoded message cut into what the broker keeps (raw bytes) and what it reads (decoded values)."""

    ttl_ms: int | None  # header.ttl
    durable: bool | None  # header.durable
    priority: int | None  # header.priority
    first_acquirer: bool | None  # header.first-acquirer
    delivery_annotation_entries: bytes  # the sender's delivery-annotation map entries, minus the broker's own
    delivery_annotation_count: int  # how many entries ``delivery_annotation_entries`` holds
    annotations: dict[Any, Any]  # decoded message annotations, read-only
    annotation_entries: bytes  # the sender's annotation map entries, minus the broker's own x-opt-* keys
    annotation_count: int  # how many entries ``annotation_entries`` holds
    message_id: Any  # decoded properties.message_id (bytes for a string id)
    bare: bytes  # the properties, application-properties, body and footer sections, verbatim, in the sender's order
    app_start: int  # offset of the application-properties section in ``bare`` (-1 when absent)
    app_end: int


def _section_bounds(payload: memoryview, start: int) -> tuple[int, int, int]:
    """Return (descriptor code, offset of the section's value constructor, end offset)."""
    if payload[start] != 0x00:
        raise ValueError("message section is not a described type")
    if payload[start + 1] == 0x53:
        code, value_at = payload[start + 2], start + 3
    elif payload[start + 1] == 0x80:
        code, value_at = struct.unpack_from(">Q", payload, start + 2)[0], start + 10
    else:
        raise ValueError("message section descriptor is not a ulong")
    rest, _ = _DECODERS[payload[value_at]](payload[value_at + 1 :])
    return code, value_at, len(payload) - len(rest)


def _map_entries(payload: memoryview, value_at: int, end: int) -> list[tuple[Any, bytes]]:
    """Split an encoded map into (decoded key, raw key+value bytes) pairs."""
    constructor = payload[value_at]
    if constructor == 0x40:  # null
        return []
    pos = value_at + (3 if constructor == 0xC1 else 9)
    entries: list[tuple[Any, bytes]] = []
    while pos < end:
        after_key, key = _DECODERS[payload[pos]](payload[pos + 1 :])
        key_end = len(payload) - len(after_key)
        after_value, _ = _DECODERS[payload[key_end]](payload[key_end + 1 :])
        value_end = len(payload) - len(after_value)
        entries.append((key, bytes(payload[pos:value_end])))
        pos = value_end
    return entries


def _kept_entries(view: memoryview, value_at: int, end: int, broker_keys: tuple[bytes, ...]) -> tuple[bytes, int]:
    kept = [raw for key, raw in _map_entries(view, value_at, end) if key not in broker_keys]
    return b"".join(kept), len(kept)


def split_message(data: bytes) -> MessageParts:
    view = memoryview(data)
    header: list[Any] = []
    delivery_entries, delivery_entry_count = b"", 0
    annotations: dict[Any, Any] = {}
    entries = b""
    count = 0
    message_id: Any = None
    bare = bytearray()  # the bare message's sections in order, wherever the sender put the annotations
    app_start = app_end = -1
    pos = 0
    while pos < len(view):
        code, value_at, end = _section_bounds(view, pos)
        if code == _HEADER:
            _, header = _DECODERS[view[value_at]](view[value_at + 1 :])
            header = list(header or [])
        elif code == _DELIVERY_ANN:
            delivery_entries, delivery_entry_count = _kept_entries(view, value_at, end, _BROKER_DELIVERY_ANNOTATIONS)
        elif code == _MESSAGE_ANN:
            _, annotations = _DECODERS[view[value_at]](view[value_at + 1 :])
            entries, count = _kept_entries(view, value_at, end, _BROKER_ANNOTATIONS)
        else:
            if code == _PROPERTIES:
                _, properties = _DECODERS[view[value_at]](view[value_at + 1 :])
                message_id = properties[0] if properties else None
            elif code == _APP_PROPERTIES:
                app_start, app_end = len(bare), len(bare) + end - pos
            bare += view[pos:end]
        pos = end
    durable, priority, ttl_ms, first_acquirer = [*header, None, None, None, None][:4]
    return MessageParts(
        ttl_ms=ttl_ms,
        durable=durable,
        priority=priority,
        first_acquirer=first_acquirer,
        delivery_annotation_entries=delivery_entries,
        delivery_annotation_count=delivery_entry_count,
        annotations=annotations or {},
        annotation_entries=entries,
        annotation_count=count,
        message_id=message_id,
        bare=bytes(bare),
        app_start=app_start,
        app_end=app_end,
    )


def _encode_map_section(code: int, entries: bytes, count: int) -> bytes:
    return bytes((0x00, 0x53, code)) + _MAP32.pack(0xD1, len(entries) + 4, count * 2) + entries


def build_message(
    bare: bytes,
    annotation_entries: bytes,
    annotation_count: int,
    *,
    header: tuple[bool | None, int | None, bool | None],
    delivery_entries: bytes,
    delivery_entry_count: int,
    delivery_count: int,
    ttl_ms: int | None,
    sequence_number: int,
    enqueued_ms: int,
    locked_until_ms: int | None,
    lock_token: uuid.UUID | None,
    message_state: int,
) -> bytes:
    """The message as the broker delivers it: the sender's header (durable, priority, first-acquirer) with the
    broker's delivery-count, the sender's annotations with the broker's, the sender's bare message.
    ``lock_token``: a peek-locked delivery's, announced as the ``x-opt-lock-token`` delivery annotation."""
    out = bytearray()
    durable, priority, first_acquirer = header
    fields = Header(
        durable=durable, priority=priority, ttl=ttl_ms, first_acquirer=first_acquirer, delivery_count=delivery_count
    )
    _encode.encode_value(out, _encode.describe_performative(fields))
    if lock_token is not None:
        token = bytearray()
        _encode.encode_symbol(token, b"x-opt-lock-token")
        _encode.encode_uuid(token, lock_token)
        delivery_entries += token
        delivery_entry_count += 1
    if delivery_entry_count:
        out += _encode_map_section(_DELIVERY_ANN, delivery_entries, delivery_entry_count)
    extra = bytearray()
    _encode.encode_symbol(extra, b"x-opt-sequence-number")
    _encode.encode_long(extra, sequence_number)
    _encode.encode_symbol(extra, b"x-opt-enqueued-time")
    _encode.encode_timestamp(extra, enqueued_ms)
    _encode.encode_symbol(extra, b"x-opt-message-state")
    _encode.encode_int(extra, message_state)
    count = 3
    if locked_until_ms is not None:
        _encode.encode_symbol(extra, b"x-opt-locked-until")
        _encode.encode_timestamp(extra, locked_until_ms)
        count += 1
    out += _encode_map_section(_MESSAGE_ANN, annotation_entries + extra, annotation_count + count)
    out += bare
    return bytes(out)


def add_application_properties(
    parts_bare: bytes, app_start: int, app_end: int, values: dict[str, str]
) -> tuple[bytes, int, int]:
    """Set string application properties (replacing keys of the same name) in ``bare``.

    Returns the new bare message and the new application-properties section's start and end offsets.
    """
    view = memoryview(parts_bare)
    kept: list[bytes] = []
    if app_start >= 0:
        _, value_at, end = _section_bounds(view, app_start)
        names = {name.encode() for name in values}
        kept = [raw for key, raw in _map_entries(view, value_at, end) if key not in names]
    added = bytearray()
    for name, value in values.items():
        _encode.encode_value(added, {_TYPE: AMQPTypes.string, _VALUE: name})
        _encode.encode_value(added, {_TYPE: AMQPTypes.string, _VALUE: value})
    section = _encode_map_section(_APP_PROPERTIES, b"".join(kept) + bytes(added), len(kept) + len(values))
    if app_start < 0:
        # No application properties yet: they go right after the properties section, or first when there is none.
        app_start = 0
        if len(view) > 2 and view[0] == 0x00 and view[1] == 0x53 and view[2] == _PROPERTIES:
            app_start = _section_bounds(view, 0)[2]
        app_end = app_start
    return bytes(view[:app_start]) + section + bytes(view[app_end:]), app_start, app_start + len(section)
