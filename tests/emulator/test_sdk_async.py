"""The real azure-servicebus SDK (``azure.servicebus.aio``) against the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import AutoLockRenewer, ServiceBusClient
from azure.servicebus.exceptions import MessageLockLostError, MessageNotFoundError, MessagingEntityNotFoundError

from tests.emulator.sdk import (
    SEVERAL_TOKEN_REQUESTS,
    Received,
    app_properties,
    assert_round_trip,
    expired_dead_letters,
    round_trip_message,
    seq,
    ttl_messages,
    ttl_queue,
)
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
    # retry_total=0: the SDK retries a MessageNotFoundError, for 11 s with its default policy
    conn_str = servicebus_emulator.connection_string
    async with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        await _send(client, ServiceBusMessage("deferred"))
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=5)
            await receiver.defer_message(message)
            assert await receiver.receive_messages(max_wait_time=0.5) == []  # deferred messages are not delivered
            (again,) = await receiver.receive_deferred_messages([seq(message)])
            assert str(again) == "deferred"
            assert again.lock_token is not None
            await receiver.complete_message(again)
            assert await receiver.peek_messages(10, sequence_number=seq(message)) == []
            with pytest.raises(MessageNotFoundError):
                await receiver.receive_deferred_messages([seq(message)])


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


async def test_schedule_and_cancel(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        async with client.get_queue_sender("jobs") as sender:
            at = datetime.now(UTC) + timedelta(seconds=1)
            kept, cancelled = await sender.schedule_messages([ServiceBusMessage("kept"), ServiceBusMessage("x")], at)
            await sender.cancel_scheduled_messages(cancelled)
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            assert [m.sequence_number for m in await receiver.peek_messages(10)] == [kept]
            (message,) = await receiver.receive_messages(max_wait_time=5)  # once its time has come
            assert (str(message), message.sequence_number) == ("kept", kept)
            assert message.scheduled_enqueue_time_utc is not None
            await receiver.complete_message(message)
            assert await receiver.receive_messages(max_wait_time=1.5) == []  # the cancelled one never comes


async def test_receive_and_delete(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("gone"))
        async with client.get_queue_receiver(
            "jobs", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, max_wait_time=5
        ) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=5)
            assert str(message) == "gone"
            assert await receiver.peek_messages(10) == []


@pytest.mark.parametrize("enabled", [True, False])
async def test_duplicate_detection(servicebus_emulator_factory: Factory, enabled: bool) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"RequiresDuplicateDetection": enabled}})
    async with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("a", message_id="job-42"))
        await _send(client, ServiceBusMessage("a again", message_id="job-42"), ServiceBusMessage("b", message_id="b"))
        async with client.get_queue_receiver("jobs") as receiver:
            bodies = [str(m) for m in await receiver.peek_messages(10)]
    assert bodies == (["a", "b"] if enabled else ["a", "a again", "b"])


async def test_message_properties_round_trip(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, round_trip_message())
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (received,) = await receiver.receive_messages(max_message_count=1, max_wait_time=5)
            assert_round_trip(received)
            await receiver.complete_message(received)
            assert await receiver.peek_messages(10, sequence_number=seq(received)) == []


@pytest.mark.parametrize("dead_letter_on_expiry", [True, False])
async def test_ttl_expiry(servicebus_emulator_factory: Factory, dead_letter_on_expiry: bool) -> None:
    emulator = servicebus_emulator_factory(ttl_queue(dead_letter_on_expiry))
    async with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        await _send(client, *ttl_messages())
        await asyncio.sleep(1.5)
        async with client.get_queue_receiver("jobs", max_wait_time=2) as receiver:
            received = await receiver.receive_messages(max_message_count=5, max_wait_time=2)
            assert [str(m) for m in received] == ["fresh"]
            await receiver.complete_message(received[0])
        async with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = await dlq.peek_messages(10)
    assert [(str(m), m.dead_letter_reason) for m in dead] == expired_dead_letters(dead_letter_on_expiry)


async def test_max_delivery_count_dead_letters(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"MaxDeliveryCount": 2}})
    async with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        await _send(client, ServiceBusMessage("flaky"))
        async with client.get_queue_receiver("jobs", max_wait_time=3) as receiver:
            for _ in range(2):
                (message,) = await receiver.receive_messages(max_wait_time=5)
                await receiver.abandon_message(message)
            assert await receiver.receive_messages(max_wait_time=0.5) == []
        async with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5) as dlq:
            (dead,) = await dlq.receive_messages(max_wait_time=5)
            assert (dead.dead_letter_reason, dead.delivery_count) == ("MaxDeliveryCountExceeded", 2)
            await dlq.complete_message(dead)


@pytest.mark.parametrize("prefetch", [0, 20])
async def test_closing_a_receiver_releases_unreceived_messages(
    servicebus_emulator: EmulatorHandle, prefetch: int
) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, *(ServiceBusMessage(f"r{i}") for i in range(5)))
        async with client.get_queue_receiver("jobs", prefetch_count=prefetch, max_wait_time=5) as receiver:
            (first,) = await receiver.receive_messages(max_message_count=1, max_wait_time=5)
            await receiver.complete_message(first)
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            rest: Received = []
            while len(rest) < 4:
                got = await receiver.receive_messages(max_message_count=4, max_wait_time=5)
                assert got, "messages stayed locked after the first receiver closed"
                rest += got
            # released, not abandoned: a release does not count as a delivery attempt
            assert [m.delivery_count for m in rest] == [0, 0, 0, 0]
            await asyncio.gather(*(receiver.complete_message(m) for m in rest))


async def test_peek_does_not_lock(servicebus_emulator: EmulatorHandle) -> None:
    async with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        await _send(client, *(ServiceBusMessage(f"p{i}") for i in range(5)))
        async with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            peeked = await receiver.peek_messages(max_message_count=3)
            assert [str(m) for m in peeked] == ["p0", "p1", "p2"]
            rest = await receiver.peek_messages(max_message_count=10)  # continues after the last peeked
            assert [str(m) for m in rest] == ["p3", "p4"]
            assert len(await receiver.peek_messages(max_message_count=10, sequence_number=seq(peeked[0]))) == 5
            received = await receiver.receive_messages(max_message_count=5, max_wait_time=5)
            assert [m.delivery_count for m in received] == [0] * 5
            await asyncio.gather(*(receiver.complete_message(m) for m in received))


@pytest.mark.parametrize("status", list(SEVERAL_TOKEN_REQUESTS.values()), ids=list(SEVERAL_TOKEN_REQUESTS))
async def test_a_management_request_with_a_lost_lock_changes_nothing(
    servicebus_emulator: EmulatorHandle, status: str | None
) -> None:
    async with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string, retry_total=0) as client,
        client.get_queue_receiver("jobs", max_wait_time=5) as receiver,
    ):
        await _send(client, ServiceBusMessage("live"), ServiceBusMessage("settled"))
        live, settled = await receiver.receive_messages(max_message_count=2, max_wait_time=5)
        tokens = [live.lock_token, settled.lock_token]  # a settled message no longer reports its token
        await receiver.complete_message(settled)
        await asyncio.sleep(0.01)  # a renewal now would move locked_until
        request = (
            receiver._renew_locks(*tokens)  # type: ignore[arg-type]
            if status is None
            else receiver._settle_message_via_mgmt_link(status, tokens)  # type: ignore[no-untyped-call]
        )
        with pytest.raises(MessageLockLostError):
            await request
        (peeked,) = await receiver.peek_messages(10, sequence_number=seq(live))
        assert (peeked.sequence_number, peeked.delivery_count) == (live.sequence_number, 0)
        assert peeked.locked_until_utc == live.locked_until_utc  # neither renewed nor settled
        await receiver.complete_message(live)  # still locked by this receiver


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
