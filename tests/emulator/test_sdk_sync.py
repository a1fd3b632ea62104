"""The real azure-servicebus SDK (sync) against the emulator: every behaviour the pipeline relies on."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.servicebus import (
    AutoLockRenewer,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus._servicebus_receiver import ServiceBusReceiver
from azure.servicebus.exceptions import MessageLockLostError, MessageNotFoundError, MessagingEntityNotFoundError

from tests.emulator.sdk import (
    SEVERAL_TOKEN_REQUESTS,
    Received,
    app_properties,
    assert_round_trip,
    expired_dead_letters,
    locked_until,
    round_trip_message,
    seq,
    ttl_messages,
    ttl_queue,
)
from tests.fixtures.servicebus import EmulatorHandle

pytestmark = pytest.mark.integration

Factory = Callable[..., EmulatorHandle]


def _send(emulator: EmulatorHandle, *messages: ServiceBusMessage, queue: str = "jobs") -> None:
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        client.get_queue_sender(queue) as sender,
    ):
        sender.send_messages(list(messages))


def _peek_all(client: ServiceBusClient, queue: str = "jobs", sub_queue: ServiceBusSubQueue | None = None) -> Received:
    with client.get_queue_receiver(queue, sub_queue=sub_queue) as receiver:
        return list(receiver.peek_messages(max_message_count=100))


def test_message_properties_round_trip(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, round_trip_message())
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (received,) = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            assert_round_trip(received)
            receiver.complete_message(received)
        assert _peek_all(client) == []


@pytest.mark.parametrize("how", ["single", "list", "batch"])
def test_send_and_receive_in_order(servicebus_emulator: EmulatorHandle, how: str) -> None:
    count = 1 if how == "single" else 25
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            messages = [ServiceBusMessage(f"m{i}", message_id=f"id-{i}") for i in range(count)]
            if how == "single":
                sender.send_messages(messages[0])
            elif how == "list":
                sender.send_messages(messages)
            else:
                batch = sender.create_message_batch()
                for message in messages:
                    batch.add_message(message)
                sender.send_messages(batch)
        received: Received = []
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            while len(received) < count:
                got = receiver.receive_messages(max_message_count=count, max_wait_time=5)
                assert got, "emulator delivered fewer messages than were sent"
                for message in got:
                    receiver.complete_message(message)
                received += got
    assert [str(m) for m in received] == [f"m{i}" for i in range(count)]
    assert [m.message_id for m in received] == [f"id-{i}" for i in range(count)]
    sequence_numbers = [seq(m) for m in received]
    assert sequence_numbers == sorted(set(sequence_numbers))


@pytest.mark.parametrize("size", [255, 256, 300_000])
def test_batch_corner_cases_message_sizes(servicebus_emulator_factory: Factory, size: int) -> None:
    """One- and many-frame transfers, and batch entries either side of the 255-byte small-encoding boundary. The
    queue allows 1 MiB messages (a Premium setting), so that three 300 kB messages fit in one batch."""
    emulator = servicebus_emulator_factory({"jobs": {"MaxMessageSizeInKilobytes": 1024}})
    bodies = [bytes([i % 251]) * size for i in range(3)]
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            batch = sender.create_message_batch()
            for body in bodies:
                batch.add_message(ServiceBusMessage(body))
            sender.send_messages(batch)
        with client.get_queue_receiver("jobs", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
            got: Received = []
            while len(got) < 3:
                more = receiver.receive_messages(max_message_count=3, max_wait_time=5)
                assert more
                got += more
    assert [b"".join(m.body) for m in got] == bodies


def test_empty_batch_sends_nothing(servicebus_emulator: EmulatorHandle) -> None:
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            sender.send_messages(sender.create_message_batch())
            sender.send_messages([])
        assert _peek_all(client) == []


def test_receive_with_iterator(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, *(ServiceBusMessage(f"it{i}") for i in range(3)))
    seen = []
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client,
        client.get_queue_receiver("jobs", max_wait_time=2) as receiver,
    ):
        for message in receiver:
            seen.append(str(message))
            receiver.complete_message(message)
    assert seen == ["it0", "it1", "it2"]


def test_abandon_redelivers_with_delivery_count_incremented(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, ServiceBusMessage("retry me"))
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client,
        client.get_queue_receiver("jobs", max_wait_time=5) as receiver,
    ):
        (first,) = receiver.receive_messages(max_wait_time=5)
        receiver.abandon_message(first)
        (second,) = receiver.receive_messages(max_wait_time=5)
        assert second.sequence_number == first.sequence_number
        assert (first.delivery_count, second.delivery_count) == (0, 1)
        receiver.complete_message(second)


def test_dead_letter_with_reason_and_description(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, ServiceBusMessage("poison", message_id="bad-1", application_properties={"k": "v"}))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            receiver.dead_letter_message(message, reason="InvalidEnvelope", error_description="missing image_url")
        assert _peek_all(client) == []
        with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5) as dlq:
            (dead,) = dlq.receive_messages(max_wait_time=5)
            assert str(dead) == "poison"
            assert dead.message_id == "bad-1"
            assert dead.dead_letter_reason == "InvalidEnvelope"
            assert dead.dead_letter_error_description == "missing image_url"
            assert app_properties(dead)[b"k"] == b"v"
            dlq.complete_message(dead)
        assert _peek_all(client, sub_queue=ServiceBusSubQueue.DEAD_LETTER) == []


def test_defer_then_receive_deferred_and_complete(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, ServiceBusMessage("later"), ServiceBusMessage("now"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=3) as receiver:
            deferred, other = receiver.receive_messages(max_message_count=2, max_wait_time=5)
            receiver.defer_message(deferred)
            receiver.complete_message(other)
            assert receiver.receive_messages(max_wait_time=0.5) == []  # deferred messages are not delivered
            (again,) = receiver.receive_deferred_messages([seq(deferred)])
            assert str(again) == "later"
            assert again.lock_token is not None
            receiver.complete_message(again)
        assert _peek_all(client) == []
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string, retry_total=0) as client,
        client.get_queue_receiver("jobs") as receiver,
        pytest.raises(MessageNotFoundError),
    ):
        receiver.receive_deferred_messages([seq(deferred)])


def test_deferred_message_can_be_abandoned_and_dead_lettered(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, ServiceBusMessage("d"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=3) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            receiver.defer_message(message)
            (again,) = receiver.receive_deferred_messages([seq(message)])
            receiver.abandon_message(again)  # back to deferred, not to the active queue
            assert receiver.receive_messages(max_wait_time=0.5) == []
            (third,) = receiver.receive_deferred_messages([seq(message)])
            assert third.delivery_count == 1
            receiver.dead_letter_message(third, reason="GaveUp", error_description="deferred too long")
        (dead,) = _peek_all(client, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        assert dead.dead_letter_reason == "GaveUp"


def test_renew_message_lock_extends_the_lock(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"LockDuration": "PT2S"}})
    _send(emulator, ServiceBusMessage("long job"))
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            first_until = locked_until(message)
            for _ in range(3):
                time.sleep(1)
                renewed = receiver.renew_message_lock(message)
            assert renewed > first_until
            receiver.complete_message(message)  # 3 s after receipt: only valid because of the renewals
        assert _peek_all(client) == []


def test_auto_lock_renewer_keeps_the_lock(servicebus_emulator_factory: Factory) -> None:
    # PT3S: the SDK's renewer wakes every second and, for short locks, renews at 75% of the whole seconds left.
    emulator = servicebus_emulator_factory({"jobs": {"LockDuration": "PT3S"}})
    _send(emulator, ServiceBusMessage("gpu job"))
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        AutoLockRenewer(max_lock_renewal_duration=30) as renewer,
    ):
        with client.get_queue_receiver("jobs", max_wait_time=5, auto_lock_renewer=renewer) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            time.sleep(4.5)  # > 1 lock duration
            receiver.complete_message(message)
            assert message.auto_renew_error is None
        assert _peek_all(client) == []


def test_lock_expiry_redelivers_and_stale_settlement_raises(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"LockDuration": "PT2S"}})
    _send(emulator, ServiceBusMessage("slow"))
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        client.get_queue_receiver("jobs", max_wait_time=5) as receiver,
    ):
        (first,) = receiver.receive_messages(max_wait_time=5)
        (second,) = receiver.receive_messages(max_wait_time=6)  # arrives once the first lock expired
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            receiver.complete_message(first)
        receiver.complete_message(second)


def test_max_delivery_count_dead_letters(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"MaxDeliveryCount": 2}})
    _send(emulator, ServiceBusMessage("flaky"))
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=3) as receiver:
            for _ in range(2):
                (message,) = receiver.receive_messages(max_wait_time=5)
                receiver.abandon_message(message)
            assert receiver.receive_messages(max_wait_time=0.5) == []
        with client.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5) as dlq:
            (dead,) = dlq.receive_messages(max_wait_time=5)
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            assert dead.delivery_count == 2
            dlq.complete_message(dead)


@pytest.mark.parametrize("dead_letter_on_expiry", [True, False])
def test_ttl_expiry(servicebus_emulator_factory: Factory, dead_letter_on_expiry: bool) -> None:
    emulator = servicebus_emulator_factory(ttl_queue(dead_letter_on_expiry))
    _send(emulator, *ttl_messages())
    time.sleep(1.5)
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=2) as receiver:
            received = receiver.receive_messages(max_message_count=5, max_wait_time=2)
            assert [str(m) for m in received] == ["fresh"]
            receiver.complete_message(received[0])
        dead = _peek_all(client, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        assert [(str(m), m.dead_letter_reason) for m in dead] == expired_dead_letters(dead_letter_on_expiry)


def test_queue_default_ttl_applies(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"DefaultMessageTimeToLive": "PT1S"}})
    _send(emulator, ServiceBusMessage("short-lived", time_to_live=timedelta(hours=1)))
    time.sleep(1.5)
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        assert _peek_all(client) == []
        (dead,) = _peek_all(client, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        assert dead.dead_letter_reason == "TTLExpiredException"


@pytest.mark.parametrize("enabled", [True, False])
def test_duplicate_detection(servicebus_emulator_factory: Factory, enabled: bool) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"RequiresDuplicateDetection": enabled}})
    _send(emulator, ServiceBusMessage("a", message_id="job-42"))
    _send(emulator, ServiceBusMessage("a again", message_id="job-42"), ServiceBusMessage("b", message_id="job-43"))
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        bodies = [str(m) for m in _peek_all(client)]
    assert bodies == (["a", "b"] if enabled else ["a", "a again", "b"])


def test_duplicate_detection_window_expires(servicebus_emulator_factory: Factory) -> None:
    emulator = servicebus_emulator_factory({"jobs": {"DuplicateDetectionHistoryTimeWindow": "PT1S"}})
    _send(emulator, ServiceBusMessage("first", message_id="same"))
    time.sleep(1.3)
    _send(emulator, ServiceBusMessage("second", message_id="same"))
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        assert [str(m) for m in _peek_all(client)] == ["first", "second"]


def test_peek_does_not_lock(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, *(ServiceBusMessage(f"p{i}") for i in range(5)))
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client,
        client.get_queue_receiver("jobs", max_wait_time=5) as receiver,
    ):
        peeked = receiver.peek_messages(max_message_count=3)
        assert [str(m) for m in peeked] == ["p0", "p1", "p2"]
        rest = receiver.peek_messages(max_message_count=10)  # continues after the last peeked
        assert [str(m) for m in rest] == ["p3", "p4"]
        from_start = receiver.peek_messages(max_message_count=10, sequence_number=seq(peeked[0]))
        assert len(from_start) == 5
        received = receiver.receive_messages(max_message_count=5, max_wait_time=5)
        assert [m.delivery_count for m in received] == [0] * 5
        for message in received:
            receiver.complete_message(message)


def test_schedule_and_cancel(servicebus_emulator: EmulatorHandle) -> None:
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_sender("jobs") as sender:
            at = datetime.now(UTC) + timedelta(seconds=1)
            kept, cancelled = sender.schedule_messages([ServiceBusMessage("kept"), ServiceBusMessage("cancelled")], at)
            sender.cancel_scheduled_messages(cancelled)
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            assert [m.sequence_number for m in receiver.peek_messages(10)] == [kept]
            (message,) = receiver.receive_messages(max_wait_time=5)
            assert str(message) == "kept"
            assert message.scheduled_enqueue_time_utc is not None
            assert datetime.now(UTC) >= at - timedelta(milliseconds=5)
            receiver.complete_message(message)
            assert receiver.receive_messages(max_wait_time=1.5) == []


def test_scheduled_enqueue_time_on_a_sent_message(servicebus_emulator: EmulatorHandle) -> None:
    message = ServiceBusMessage("at")
    at = datetime.now(UTC) + timedelta(minutes=5)
    message.scheduled_enqueue_time_utc = at
    _send(servicebus_emulator, message)
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            assert receiver.receive_messages(max_wait_time=0.5) == []  # not before its time
            (peeked,) = receiver.peek_messages(10)
            assert peeked.scheduled_enqueue_time_utc is not None
            assert abs(peeked.scheduled_enqueue_time_utc - at) < timedelta(milliseconds=2)
        with client.get_queue_sender("jobs") as sender:
            sender.cancel_scheduled_messages(seq(peeked))
        assert _peek_all(client) == []


def test_receive_and_delete(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, ServiceBusMessage("once"), ServiceBusMessage("twice"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver(
            "jobs", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, max_wait_time=5
        ) as receiver:
            received = receiver.receive_messages(max_message_count=2, max_wait_time=5)
            assert sorted(str(m) for m in received) == ["once", "twice"]
        assert _peek_all(client) == []


@pytest.mark.parametrize("prefetch", [0, 20])
def test_closing_a_receiver_releases_unreceived_messages(servicebus_emulator: EmulatorHandle, prefetch: int) -> None:
    _send(servicebus_emulator, *(ServiceBusMessage(f"r{i}") for i in range(5)))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        with client.get_queue_receiver("jobs", prefetch_count=prefetch, max_wait_time=5) as receiver:
            (first,) = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            receiver.complete_message(first)
        with client.get_queue_receiver("jobs", max_wait_time=5) as receiver:
            rest: Received = []
            while len(rest) < 4:
                got = receiver.receive_messages(max_message_count=4, max_wait_time=5)
                assert got, "messages stayed locked after the first receiver closed"
                rest += got
            # released, not abandoned: a release does not count as a delivery attempt
            assert [m.delivery_count for m in rest] == [0, 0, 0, 0]
            for message in rest:
                receiver.complete_message(message)


def _send_to(client: ServiceBusClient, name: str) -> None:
    with client.get_queue_sender(name) as sender:
        sender.send_messages(ServiceBusMessage("x"))


def _receive_from(client: ServiceBusClient, name: str) -> None:
    with client.get_queue_receiver(name, max_wait_time=1) as receiver:
        receiver.receive_messages(max_wait_time=1)


def _peek_at(client: ServiceBusClient, name: str) -> None:
    with client.get_queue_receiver(name) as receiver:
        receiver.peek_messages()


@pytest.mark.parametrize("operation", [_send_to, _receive_from, _peek_at], ids=["send", "receive", "peek"])
def test_unknown_entity_raises_not_found(
    servicebus_emulator: EmulatorHandle, operation: Callable[[ServiceBusClient, str], None]
) -> None:
    name = f"missing-{uuid.uuid4().hex[:6]}"
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string, retry_total=0) as client,
        pytest.raises(MessagingEntityNotFoundError),
    ):
        operation(client, name)


def test_competing_receivers_share_the_queue(servicebus_emulator: EmulatorHandle) -> None:
    _send(servicebus_emulator, *(ServiceBusMessage(f"c{i}") for i in range(10)))
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client,
        client.get_queue_receiver("jobs", max_wait_time=3) as one,
        client.get_queue_receiver("jobs", max_wait_time=3) as two,
    ):
        a = one.receive_messages(max_message_count=5, max_wait_time=3)
        b = two.receive_messages(max_message_count=10, max_wait_time=3)
        assert len(a) + len(b) == 10
        assert not {m.sequence_number for m in a} & {m.sequence_number for m in b}
        for message in a:
            one.complete_message(message)
        for message in b:
            two.complete_message(message)


def _several_tokens(status: str | None) -> Callable[[ServiceBusReceiver, list[Any]], object]:
    def request(receiver: ServiceBusReceiver, tokens: list[Any]) -> object:
        if status is None:
            return receiver._renew_locks(*tokens)
        return receiver._settle_message_via_mgmt_link(status, tokens)

    return request


@pytest.mark.parametrize("status", list(SEVERAL_TOKEN_REQUESTS.values()), ids=list(SEVERAL_TOKEN_REQUESTS))
def test_a_management_request_with_a_lost_lock_changes_nothing(
    servicebus_emulator: EmulatorHandle, status: str | None
) -> None:
    _send(servicebus_emulator, ServiceBusMessage("live"), ServiceBusMessage("settled"))
    with (
        ServiceBusClient.from_connection_string(servicebus_emulator.connection_string, retry_total=0) as client,
        client.get_queue_receiver("jobs", max_wait_time=5) as receiver,
    ):
        live, settled = receiver.receive_messages(max_message_count=2, max_wait_time=5)
        tokens = [live.lock_token, settled.lock_token]  # a settled message no longer reports its token
        receiver.complete_message(settled)
        time.sleep(0.01)  # a renewal now would move locked_until
        with pytest.raises(MessageLockLostError):
            _several_tokens(status)(receiver, tokens)
        (peeked,) = receiver.peek_messages(10, sequence_number=seq(live))  # not the settled one: it is gone
        assert (peeked.sequence_number, peeked.delivery_count) == (live.sequence_number, 0)
        assert peeked.locked_until_utc == live.locked_until_utc  # neither renewed nor settled
        receiver.complete_message(live)  # still locked by this receiver
        assert receiver.peek_messages(10, sequence_number=seq(live)) == []
