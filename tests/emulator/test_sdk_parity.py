"""What the real azure-servicebus SDK (sync) sees of the service's finer points, each once found missing by running
the SDK's own queue tests against the emulator (``make sdk-suite``): lock-token and message-state annotations, the
sender's header, the refusal of session receivers, the message size limit, malformed management requests and
all-or-nothing deferred receives.

One emulator serves the module; each test has its own queue, so the tests stay independent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
    ServiceBusReceiveMode,
    ServiceBusSender,
)
from azure.servicebus.amqp import AmqpMessageHeader
from azure.servicebus.exceptions import MessageNotFoundError, MessageSizeExceededError, ServiceBusError

from local.servicebus_emulator import EmulatorStartError, start_emulator
from local.servicebus_emulator.process import connection_string
from tests.emulator.sdk import seq
from tests.fixtures.backends import unavailable

pytestmark = pytest.mark.integration

# Queue name -> Config.json properties; every other property takes the service's default.
QUEUES: dict[str, dict[str, Any]] = {
    "lock-token": {},
    "header": {},
    "state": {},
    "session": {},
    "standard": {},  # MaxMessageSizeInKilobytes: 256, the Standard tier's default
    "premium": {"MaxMessageSizeInKilobytes": 1024},
    "malformed": {},
    "deferred": {},
}
KIB = 1024
LOCK_TOKEN = b"x-opt-lock-token"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceBusClient]:
    root = tmp_path_factory.mktemp("parity")
    queues = [{"Name": name, "Properties": props} for name, props in QUEUES.items()]
    config = root / "config.json"
    config.write_text(json.dumps({"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": queues}]}}), "utf-8")
    try:
        process, port = start_emulator(config, root / "data")
    except (EmulatorStartError, OSError) as exc:
        unavailable(f"Service Bus emulator: {exc}")
        raise  # unreachable: unavailable() skips or fails
    try:
        with ServiceBusClient.from_connection_string(connection_string("127.0.0.1", port), retry_total=0) as bus:
            yield bus
    finally:
        process.terminate()
        process.wait(timeout=10)


def _sender(client: ServiceBusClient, queue: str) -> ServiceBusSender:
    """Without the keep-alive thread, which the SDK joins on close and which sleeps a second at a time."""
    return client.get_queue_sender(queue, keep_alive=None)


def _send(client: ServiceBusClient, queue: str, *messages: ServiceBusMessage) -> None:
    with _sender(client, queue) as sender:
        sender.send_messages(list(messages))


def test_peek_locked_messages_carry_their_lock_token(client: ServiceBusClient) -> None:
    _send(client, "lock-token", ServiceBusMessage("one"), ServiceBusMessage("two"))
    with client.get_queue_receiver("lock-token", max_wait_time=5) as receiver:
        first, second = receiver.receive_messages(max_message_count=2, max_wait_time=5)
        for message in (first, second):
            assert isinstance(message.lock_token, uuid.UUID)
            assert message.raw_amqp_message.delivery_annotations == {LOCK_TOKEN: message.lock_token}
        receiver.complete_message(first)
        receiver.defer_message(second)
        (deferred,) = receiver.receive_deferred_messages([seq(second)])
        assert deferred.raw_amqp_message.delivery_annotations == {LOCK_TOKEN: deferred.lock_token}
        receiver.complete_message(deferred)


def test_the_senders_header_and_delivery_annotations_are_kept(client: ServiceBusClient) -> None:
    message = ServiceBusMessage("head")
    message.raw_amqp_message.header = AmqpMessageHeader(priority=7, durable=True, first_acquirer=True)
    message.raw_amqp_message.delivery_annotations = {b"sender-note": 3}
    _send(client, "header", message)
    with client.get_queue_receiver("header", max_wait_time=5) as receiver:
        (received,) = receiver.receive_messages(max_wait_time=5)
        header = received.raw_amqp_message.header
        assert header is not None
        assert (header.priority, header.durable, header.first_acquirer) == (7, True, True)
        assert header.delivery_count == 0
        annotations = received.raw_amqp_message.delivery_annotations
        assert annotations == {b"sender-note": 3, LOCK_TOKEN: received.lock_token}
        receiver.complete_message(received)


def test_peeked_messages_report_their_state(client: ServiceBusClient) -> None:
    with _sender(client, "state") as sender:
        sender.send_messages([ServiceBusMessage("deferred"), ServiceBusMessage("active")])
        sender.schedule_messages(ServiceBusMessage("scheduled"), datetime.now(UTC) + timedelta(hours=1))
    with client.get_queue_receiver("state", max_wait_time=5) as receiver:
        (to_defer,) = receiver.receive_messages(max_wait_time=5)
        receiver.defer_message(to_defer)
        peeked = {str(m): m.state for m in receiver.peek_messages(10, sequence_number=1)}
        assert peeked == {
            "deferred": ServiceBusMessageState.DEFERRED,
            "active": ServiceBusMessageState.ACTIVE,
            "scheduled": ServiceBusMessageState.SCHEDULED,
        }
        (deferred,) = receiver.receive_deferred_messages([seq(to_defer)])
        assert deferred.state == ServiceBusMessageState.DEFERRED
        receiver.complete_message(deferred)


def test_a_session_receiver_on_a_queue_without_sessions_is_refused(client: ServiceBusClient) -> None:
    _send(client, "session", ServiceBusMessage("plain", session_id="s1"))  # the id is only a property here
    with (
        pytest.raises(ServiceBusError) as excinfo,  # what the SDK raises for the service's amqp:not-allowed ...
        client.get_queue_receiver("session", session_id="s1") as receiver,  # ... while it opens the receiver
    ):
        receiver.receive_messages(max_wait_time=2)
    assert type(excinfo.value) is ServiceBusError
    assert "sessionful message receiver cannot be created" in str(excinfo.value)
    with client.get_queue_receiver("session", max_wait_time=5) as plain:
        (message,) = plain.receive_messages(max_wait_time=5)  # never served to the session receiver
        assert (str(message), message.delivery_count, message.session_id) == ("plain", 0, "s1")
        plain.complete_message(message)


def _body(kib: int) -> bytes:
    return b"x" * (kib * KIB)


def test_the_standard_tier_limits_messages_and_batches_to_256_kib(client: ServiceBusClient) -> None:
    with _sender(client, "standard") as sender:
        sender.send_messages(ServiceBusMessage(_body(250)))  # fits, with its headers
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages(ServiceBusMessage(_body(257)))
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages([ServiceBusMessage(_body(150)), ServiceBusMessage(_body(150))])  # one batch
        with pytest.raises(MessageSizeExceededError):
            sender.create_message_batch().add_message(ServiceBusMessage(_body(257)))
        with pytest.raises(MessageSizeExceededError):
            sender.schedule_messages(ServiceBusMessage(_body(257)), datetime.now(UTC) + timedelta(hours=1))
        # The SDK checks the limit the link announced before it sends; the broker enforces it too.
        sender._max_message_size_on_link = 100 * 1024 * KIB
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages(ServiceBusMessage(_body(300)))
    with client.get_queue_receiver("standard") as receiver:
        assert [len(b"".join(m.body)) for m in receiver.peek_messages(10)] == [250 * KIB]


def test_a_larger_limit_is_a_queue_setting(client: ServiceBusClient) -> None:
    with _sender(client, "premium") as sender:
        sender.send_messages(ServiceBusMessage(_body(1000)))
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages(ServiceBusMessage(_body(1025)))
    with client.get_queue_receiver("premium", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        (message,) = receiver.receive_messages(max_wait_time=5)
        assert len(b"".join(message.body)) == 1000 * KIB
        assert not message.raw_amqp_message.delivery_annotations  # received and deleted: no lock, no lock token


def test_a_malformed_management_request_is_answered_not_fatal(client: ServiceBusClient) -> None:
    _send(client, "malformed", ServiceBusMessage("m"))
    with client.get_queue_receiver("malformed", max_wait_time=5) as receiver:
        (message,) = receiver.receive_messages(max_wait_time=5)
        with pytest.raises(ServiceBusError, match="argument-error"):
            receiver._renew_locks(None)  # type: ignore[arg-type]
        with pytest.raises(ServiceBusError, match="argument-error"):
            receiver._settle_message_via_mgmt_link("completed", [None])  # type: ignore[list-item]
        receiver.complete_message(message)  # the same connection, still open; the lock still held
        assert receiver.peek_messages(10) == []


def test_receiving_deferred_messages_is_all_or_nothing(client: ServiceBusClient) -> None:
    _send(client, "deferred", ServiceBusMessage("kept"))
    with client.get_queue_receiver("deferred", max_wait_time=5) as receiver:
        (message,) = receiver.receive_messages(max_wait_time=5)
        receiver.defer_message(message)
        with pytest.raises(MessageNotFoundError):
            receiver.receive_deferred_messages([seq(message), seq(message) + 1000])
        (peeked,) = receiver.peek_messages(10, sequence_number=seq(message))
        assert (peeked.state, peeked.locked_until_utc) == (ServiceBusMessageState.DEFERRED, None)  # not locked
        (again,) = receiver.receive_deferred_messages([seq(message)])
        receiver.complete_message(again)
