"""The locks of the messages in hand (gpu_worker.renewal, gpu_worker.receiver): renewed until the settlement, through
a receiver that a failed receive closed, and a renewal that waited behind its message's settlement is not a lost lock.

The receiver reopened is the real SDK's (``ServiceBusReceiver._open``) on a namespace that does not resolve: what
its reopen raises is a ``ServiceBusError`` (a failed settlement, caught), not the ``ValueError`` of a closed handler.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage
from azure.servicebus._pyamqp.message import Message, Properties
from azure.servicebus.exceptions import ServiceBusError

from gpu_worker.receiver import SerialReceiver
from gpu_worker.renewal import LockRenewer

WAIT = 5.0  # seconds: a bound on a hang, never a speed claim


class Held:
    """What the renewer reads of a received message."""

    def __init__(self, seconds: float) -> None:
        self.message_id = "m"
        self._settled = False
        self.locked_until_utc: datetime | None = datetime.now(UTC) + timedelta(seconds=seconds)


class ClosedThenOpen:
    """A receiver whose handler a failed receive closed: the first renewal fails as the SDK's does (``ValueError``),
    the next ones renew."""

    def __init__(self) -> None:
        self.calls = 0
        self.renewed = threading.Event()

    def renew_message_lock(self, message: Any) -> datetime:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("Failed to renew the message as the handler has already been shutdown.")
        message.locked_until_utc = datetime.now(UTC) + timedelta(seconds=30)
        self.renewed.set()
        return cast(datetime, message.locked_until_utc)


def test_a_renewal_that_fails_while_the_lock_runs_is_tried_again_and_nothing_is_reported_lost() -> None:
    failures: list[Any] = []
    receiver, message = ClosedThenOpen(), Held(seconds=1.0)
    with LockRenewer(lambda m, e: failures.append(e), tick=0.05, margin=10) as renewer:
        renewer.register(receiver, cast(ServiceBusReceivedMessage, message))
        assert receiver.renewed.wait(WAIT)
    assert failures == []


def test_a_message_is_renewed_until_forgotten_whatever_the_time_since_its_receive() -> None:
    receiver, message = ClosedThenOpen(), Held(seconds=0.4)
    receiver.calls = 1  # no failure
    with LockRenewer(lambda m, e: None, tick=0.05, margin=10) as renewer:
        renewer.register(receiver, cast(ServiceBusReceivedMessage, message))
        assert receiver.renewed.wait(WAIT)
        renewer.forget(cast(ServiceBusReceivedMessage, message))
        assert not renewer.holds(cast(ServiceBusReceivedMessage, message))


def test_a_renewal_behind_the_settlement_of_its_message_is_not_a_lost_lock() -> None:
    """The renewer passed its check, then waited for the receiver's lock while the message was settled."""
    message = Held(seconds=30)
    message._settled = True

    class Refusing:
        def renew_message_lock(self, message: Any, **kwargs: Any) -> datetime:
            raise AssertionError("a settled message is not renewed")

    assert SerialReceiver(cast(Any, Refusing())).renew_message_lock(cast(Any, message)) == message.locked_until_utc


def test_a_settlement_on_a_receiver_closed_by_a_failed_receive_reopens_it_rather_than_raising_value_error() -> None:
    client = ServiceBusClient.from_connection_string(
        "Endpoint=sb://localhost.invalid/;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true",
        retry_total=0,
    )
    receiver = client.get_queue_receiver("jobs")
    assert receiver._running is False  # as after a receive whose retries closed the handler
    message = ServiceBusReceivedMessage(
        Message(data=[b"{}"], properties=Properties(message_id="x")),
        receiver=receiver,
        frame=cast(Any, [0, 1, uuid.uuid4().bytes]),  # handle, delivery id, delivery tag
    )
    with pytest.raises(ServiceBusError):  # the reopen fails (no such host): a failed settlement, caught by Settler
        SerialReceiver(receiver).complete_message(message)
    client.close()
