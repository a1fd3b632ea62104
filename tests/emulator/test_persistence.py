"""Restart persistence: state survives SIGTERM and SIGKILL; locks held at shutdown are released, count + 1."""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.exceptions import MessageLockLostError

from tests.emulator.sdk import RESTART_PEEKED, RESTART_RECEIVED, RESTART_SENT, seq
from tests.fixtures.servicebus import EmulatorHandle

pytestmark = pytest.mark.integration

Factory = Callable[..., EmulatorHandle]


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])


@SIGNALS
def test_restart_keeps_every_kind_of_message(servicebus_emulator: EmulatorHandle, sig: int) -> None:
    emulator = servicebus_emulator
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            sender.send_messages([ServiceBusMessage(name, message_id=name) for name in RESTART_SENT])
            (scheduled,) = sender.schedule_messages(
                ServiceBusMessage("scheduled"), datetime.now(UTC) + timedelta(hours=1)
            )
            sender.send_messages(ServiceBusMessage("active", message_id="active"))
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            locked, dead, deferred = receiver.receive_messages(max_message_count=3, max_wait_time=5)
            receiver.dead_letter_message(dead, reason="Bad", error_description="bad input")
            receiver.defer_message(deferred)
            assert str(locked) == "locked"  # received, never settled: still locked when the broker stops
    emulator.stop(sig)
    emulator.start()
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            peeked = {str(m): m for m in receiver.peek_messages(10)}
            assert set(peeked) == RESTART_PEEKED
            assert peeked["scheduled"].sequence_number == scheduled
            received = receiver.receive_messages(max_message_count=5, max_wait_time=5)
            by_body = {str(m): m for m in received}
            assert set(by_body) == RESTART_RECEIVED
            assert by_body["locked"].delivery_count == 1  # the lost lock counted as a delivery attempt
            assert by_body["active"].delivery_count == 0
            for message in received:
                receiver.complete_message(message)
            (again,) = receiver.receive_deferred_messages([seq(deferred)])
            receiver.complete_message(again)
        with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (dead_again,) = dlq.peek_messages(10)
            assert (str(dead_again), dead_again.dead_letter_reason) == ("dead", "Bad")


@SIGNALS
async def test_restart_keeps_every_kind_of_message_async(servicebus_emulator: EmulatorHandle, sig: int) -> None:
    emulator = servicebus_emulator
    async with AsyncServiceBusClient.from_connection_string(emulator.connection_string) as client:
        async with client.get_queue_sender("jobs") as sender:
            await sender.send_messages([ServiceBusMessage(name, message_id=name) for name in RESTART_SENT])
            (scheduled,) = await sender.schedule_messages(
                ServiceBusMessage("scheduled"), datetime.now(UTC) + timedelta(hours=1)
            )
            await sender.send_messages(ServiceBusMessage("active", message_id="active"))
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            locked, dead, deferred = await receiver.receive_messages(max_message_count=3, max_wait_time=5)
            await receiver.dead_letter_message(dead, reason="Bad", error_description="bad input")
            await receiver.defer_message(deferred)
            assert str(locked) == "locked"
    emulator.stop(sig)
    emulator.start()
    async with AsyncServiceBusClient.from_connection_string(emulator.connection_string) as client:
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            peeked = {str(m): m for m in await receiver.peek_messages(10)}
            assert set(peeked) == RESTART_PEEKED
            assert peeked["scheduled"].sequence_number == scheduled
            received = await receiver.receive_messages(max_message_count=5, max_wait_time=5)
            by_body = {str(m): m for m in received}
            assert set(by_body) == RESTART_RECEIVED
            assert (by_body["locked"].delivery_count, by_body["active"].delivery_count) == (1, 0)
            for message in received:
                await receiver.complete_message(message)
            (again,) = await receiver.receive_deferred_messages([seq(deferred)])
            await receiver.complete_message(again)
        async with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (dead_again,) = await dlq.peek_messages(10)
            assert (str(dead_again), dead_again.dead_letter_reason) == ("dead", "Bad")


# The SDK leaves the socket of the connection the broker dropped for the garbage collector to close (a
# ResourceWarning raised as "unraisable"); that is the client's doing and only happens when the broker dies.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_settling_a_lock_lost_in_a_restart_raises(servicebus_emulator: EmulatorHandle) -> None:
    emulator = servicebus_emulator
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            sender.send_messages(ServiceBusMessage("in flight"))
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            emulator.stop(signal.SIGKILL)
            emulator.start()
            # The client still believes its lock valid; the broker lost it in the restart. The SDK reconnects and
            # settles through the management link, which answers 410 message-lock-lost.
            with pytest.raises(MessageLockLostError):
                receiver.complete_message(message)
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (redelivered,) = receiver.receive_messages(max_wait_time=5)
            assert redelivered.delivery_count == 1
            receiver.complete_message(redelivered)
    gc.collect()  # collect the dropped connection's socket here, where its warning is filtered
