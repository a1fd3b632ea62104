"""The real azure-servicebus SDK (``azure.servicebus.aio``) against the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import AutoLockRenewer, ServiceBusClient
from azure.servicebus.exceptions import MessageLockLostError, MessagingEntityNotFoundError

from tests.emulator.sdk import Received, app_properties, seq
from tests.fixtures.servicebus import EmulatorHandle

pytestmark = pytest.mark.integration

Factory = Callable[..., EmulatorHandle]


async def _send(client: ServiceBusClient, *messages: ServiceBusMessage) -> None:
    async with client.get_queue_sender("jobs") as sender:
        await sender.send_messages(list(messages))


async def test_batch_send_receive_complete(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        async with client.get_queue_sender("jobs") as sender:
            batch = await sender.create_message_batch()
            for i in range(10):
                batch.add_message(ServiceBusMessage(f"a{i}", application_properties={"i": i}))
            await sender.send_messages(batch)
        received: Received = []
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            while len(received) < 10:
                got = await receiver.receive_messages(max_message_count=10, max_wait_time=5)
                assert got
                await asyncio.gather(*(receiver.complete_message(m) for m in got))
                received += got
            assert [app_properties(m)[b"i"] for m in received] == list(range(10))
            assert await receiver.peek_messages(10) == []


async def test_iterator_abandon_then_complete(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("once more"))
        counts = []
        async with client.get_queue_receiver("jobs", max_wait_time=3) as receiver:
            async for message in receiver:
                counts.append(message.delivery_count)
                if message.delivery_count == 0:
                    await receiver.abandon_message(message)
                else:
                    await receiver.complete_message(message)
                    break
        assert counts == [0, 1]


async def test_dead_letter_and_read_the_dead_letter_queue(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("poison"))
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=5)
            await receiver.dead_letter_message(message, reason="UnreadableImage", error_description="not a GeoTIFF")
        async with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5) as dlq:
            (dead,) = await dlq.receive_messages(max_wait_time=5)
            assert (dead.dead_letter_reason, dead.dead_letter_error_description) == (
                "UnreadableImage",
                "not a GeoTIFF",
            )
            await dlq.complete_message(dead)


async def test_defer_and_receive_deferred(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("deferred"))
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=5)
            await receiver.defer_message(message)
            (again,) = await receiver.receive_deferred_messages([seq(message)])
            assert str(again) == "deferred"
            await receiver.complete_message(again)
            assert await receiver.peek_messages(10) == []


async def test_renew_lock_and_auto_lock_renewer(servicebus_emulator_factory: Factory) -> None:
    # PT3S: the SDK's renewer wakes every second and, for short locks, renews at 75% of the whole seconds left.
    emulator = servicebus_emulator_factory({"jobs": {"LockDuration": "PT3S"}})
    async with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("one"), ServiceBusMessage("two"))
        renewer = AutoLockRenewer(max_lock_renewal_duration=30)
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            first, second = await receiver.receive_messages(max_message_count=2, max_wait_time=5)
            renewer.register(receiver, first)
            before = second.locked_until_utc
            await asyncio.sleep(1)
            assert before is not None
            assert await receiver.renew_message_lock(second) > before
            await asyncio.sleep(3.5)  # the manual renewal has lapsed; the auto-renewed lock has not
            await receiver.complete_message(first)
            with pytest.raises(MessageLockLostError):
                await receiver.complete_message(second)
        await renewer.close()


async def test_lock_expiry_redelivers(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"LockDuration": "PT2S", "MaxDeliveryCount": 2}})
    async with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("crashy"))
        async with client.get_queue_receiver("jobs", max_wait_time=6) as receiver:
            (first,) = await receiver.receive_messages(max_wait_time=5)
            (second,) = await receiver.receive_messages(max_wait_time=6)
            assert (first.delivery_count, second.delivery_count) == (0, 1)
            # the second lock expiry reaches MaxDeliveryCount: dead-lettered, not redelivered
            assert await receiver.receive_messages(max_wait_time=3) == []
        async with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (dead,) = await dlq.peek_messages(10)
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"


async def test_schedule_cancel_and_peek(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        async with client.get_queue_sender("jobs") as sender:
            at = datetime.now(UTC) + timedelta(minutes=10)
            seqs = await sender.schedule_messages([ServiceBusMessage("x"), ServiceBusMessage("y")], at)
            await sender.cancel_scheduled_messages(seqs[0])
        async with client.get_queue_receiver("jobs") as receiver:
            peeked = await receiver.peek_messages(10)
            assert [m.sequence_number for m in peeked] == [seqs[1]]
            assert await receiver.receive_messages(max_wait_time=0.5) == []


async def test_receive_and_delete(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("gone"))
        async with client.get_queue_receiver(
            "jobs", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, max_wait_time=5
        ) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=5)
            assert str(message) == "gone"
            assert await receiver.peek_messages(10) == []


async def test_duplicate_detection(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("1", message_id="job-1"), ServiceBusMessage("1b", message_id="job-1"))
        async with client.get_queue_receiver("jobs") as receiver:
            assert [str(m) for m in await receiver.peek_messages(10)] == ["1"]


async def _send_to(client: ServiceBusClient) -> None:
    async with client.get_queue_sender("nope") as sender:
        await sender.send_messages(ServiceBusMessage("x"))


async def _receive_from(client: ServiceBusClient) -> None:
    async with client.get_queue_receiver("nope", max_wait_time=1) as receiver:
        await receiver.receive_messages(max_wait_time=1)


@pytest.mark.parametrize("operation", [_send_to, _receive_from], ids=["send", "receive"])
async def test_unknown_entity(
    servicebus_emulator: EmulatorHandle, operation: Callable[[ServiceBusClient], Awaitable[None]]
) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string, retry_total=0) as client:
        with pytest.raises(MessagingEntityNotFoundError):
            await operation(client)
