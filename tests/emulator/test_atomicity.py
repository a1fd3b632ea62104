"""Each transition is atomic: a rejected batch or a frame that fails half-way leaves nothing in the store.

The SDK never sends a malformed batch, so these tests speak AMQP to a real :class:`Connection` and :class:`Broker`
over an in-process transport, with frames and messages encoded by the SDK's own ``_pyamqp`` codec.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus._pyamqp import _encode
from azure.servicebus._pyamqp.endpoints import Target
from azure.servicebus._pyamqp.message import BatchMessage, Message
from azure.servicebus._pyamqp.performatives import AttachFrame, BeginFrame, OpenFrame, TransferFrame
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport

from local.servicebus_emulator import frames
from local.servicebus_emulator.broker import BATCH_FORMAT, Broker
from local.servicebus_emulator.config import EmulatorConfig, QueueConfig
from local.servicebus_emulator.connection import Connection
from local.servicebus_emulator.store import Store

QUEUE = QueueConfig(name="jobs")  # the service's defaults
_DISPOSITION, _CLOSE = 0x15, 0x18
_SCHEDULE = b"com.microsoft:schedule-message"


class _Wire(asyncio.Transport):
    """The broker's side of an in-process connection: records what the broker writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def received(self) -> list[frames.Frame]:
        buffer = frames.FrameBuffer(1 << 20)
        buffer.feed(bytes(self.written))
        assert buffer.header() == frames.AMQP_HEADER
        return list(buffer.frames())


def _encoded(body: str) -> bytes:
    amqp = PyamqpTransport.to_outgoing_amqp_message(ServiceBusMessage(body)._raw_amqp_message)
    return bytes(_encode.encode_payload(bytearray(), amqp))


def _payload(message: Any) -> bytes:
    return bytes(_encode.encode_payload(bytearray(), message))


def _transfer(handle: int, delivery_id: int, payload: bytes, message_format: int = 0) -> bytes:
    return frames.encode(
        0,
        frames.make(
            TransferFrame,
            handle=handle,
            delivery_id=delivery_id,
            delivery_tag=delivery_id.to_bytes(4, "big"),
            message_format=message_format,
            settled=False,
            payload=payload,
        ),
    )


def _open_sender(address: str) -> bytes:
    """AMQP header, open, begin, and a sender link (handle 0) to ``address``."""
    return (
        frames.AMQP_HEADER
        + frames.encode(0, frames.make(OpenFrame, container_id="test", max_frame_size=1 << 20))
        + frames.encode(0, frames.make(BeginFrame, next_outgoing_id=0, incoming_window=1000, outgoing_window=1000))
        + frames.encode(
            0,
            frames.make(
                AttachFrame,
                name="sender",
                handle=0,
                role=False,
                target=frames.make(Target, address=f"amqps://127.0.0.1/{address}"),
                initial_delivery_count=0,
            ),
        )
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    store = Store(tmp_path / "servicebus.sqlite3", [QUEUE])
    broker = Broker(EmulatorConfig(namespace="sbemulatorns", queues=(QUEUE,)), store)
    yield broker
    broker.store.close()


def _connect(broker: Broker, address: str = "jobs") -> tuple[Connection, _Wire]:
    connection, wire = Connection(broker), _Wire()
    connection.connection_made(wire)
    connection.data_received(_open_sender(address))
    return connection, wire


def _dispositions(wire: _Wire) -> list[Any]:
    """The outcomes (delivery states) the broker sent back, in order."""
    return [frame.fields[4] for frame in wire.received() if frame.code == _DISPOSITION]


@pytest.mark.parametrize(
    "bad",
    [b"\x00\x53\x75\xff", b"garbage", b"\x00\xa1\x01x\x40", b"\x00\x53"],
    ids=["unknown-constructor", "not-a-section", "descriptor-not-ulong", "cut-in-descriptor"],
)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_batch_with_one_malformed_message_is_rejected_whole(broker: Broker, bad: bytes, position: int) -> None:
    connection, wire = _connect(broker)
    sections = [_encoded("good 1"), _encoded("good 2")]
    sections.insert(position, bad)
    connection.data_received(_transfer(0, 0, _payload(BatchMessage(data=sections)), BATCH_FORMAT))
    (state,) = _dispositions(wire)
    assert "rejected" in state
    assert broker.store.count("jobs") == 0
    connection.data_received(_transfer(0, 1, _payload(BatchMessage(data=[_encoded("ok")])), BATCH_FORMAT))
    assert "accepted" in _dispositions(wire)[1]  # the link is still usable and stores a good batch
    assert broker.store.count("jobs") == 1


def _schedule_request(*entries: dict[bytes, Any]) -> bytes:
    return _payload(
        Message(application_properties={b"operation": _SCHEDULE}, value={b"messages": list(entries)}),
    )


def test_a_frame_failing_half_way_rolls_back_the_turn(broker: Broker) -> None:
    """The failing frame (a transfer on a link never attached) arrives in the same read as a good transfer, after
    it: the good transfer was never acknowledged, so the whole read is undone."""
    connection, wire = _connect(broker)
    connection.data_received(_transfer(0, 0, _payload(Message(data=[b"good"]))) + _transfer(7, 1, _encoded("lost")))
    assert broker.store.count("jobs") == 0
    close = [f for f in wire.received() if f.code == _CLOSE]
    assert len(close) == 1
    assert close[0].fields[0][0] == b"amqp:internal-error"
    assert _dispositions(wire) == []  # no acknowledgement for work that was not kept
    assert wire.closed
    other, other_wire = _connect(broker)  # the broker itself carries on
    other.data_received(_transfer(0, 0, _payload(Message(data=[b"after"]))))
    assert "accepted" in _dispositions(other_wire)[0]
    assert broker.store.count("jobs") == 1


def test_a_malformed_schedule_request_stores_nothing_and_keeps_the_connection(broker: Broker) -> None:
    """Its second entry has no message: the request is answered (400, see the SDK tests) before its first message
    is stored, and the connection carries on."""
    connection, wire = _connect(broker, "jobs/$management")
    malformed = _schedule_request({b"message": _encoded("first")}, {b"no-message": b""})
    connection.data_received(_transfer(0, 0, malformed) + _transfer(0, 1, _schedule_request()))
    assert broker.store.count("jobs") == 0
    assert [f for f in wire.received() if f.code == _CLOSE] == []
    assert ["accepted" in state for state in _dispositions(wire)] == [True, True]
    assert not wire.closed
