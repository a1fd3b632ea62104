"""What the sync and the async SDK tests share: typed accessors for received messages (the SDK types these
optional, a broker always sets them), and the messages and expectations of scenarios both of them run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus._common.constants import (
    SETTLEMENT_ABANDON,
    SETTLEMENT_COMPLETE,
    SETTLEMENT_DEADLETTER,
    SETTLEMENT_DEFER,
)

Received = list[ServiceBusReceivedMessage]

# Management requests naming several lock tokens, one of them lost: None = renew-lock, else the update-disposition
# status. The public API sends one token per request; the SDK's own request functions take several.
SEVERAL_TOKEN_REQUESTS: dict[str, str | None] = {
    "renew-lock": None,
    **{
        f"update-disposition-{status}": status
        for status in (SETTLEMENT_COMPLETE, SETTLEMENT_ABANDON, SETTLEMENT_DEFER, SETTLEMENT_DEADLETTER)
    },
}

# Restart persistence: messages left in every state before the broker stops.
RESTART_SENT = ("locked", "dead", "deferred")
RESTART_PEEKED = {"locked", "deferred", "scheduled", "active"}
RESTART_RECEIVED = {"locked", "active"}


def seq(message: ServiceBusReceivedMessage) -> int:
    assert message.sequence_number is not None
    return message.sequence_number


def locked_until(message: ServiceBusReceivedMessage) -> datetime:
    assert message.locked_until_utc is not None
    return message.locked_until_utc


def app_properties(message: ServiceBusReceivedMessage) -> dict[Any, Any]:
    assert message.application_properties is not None
    return dict(message.application_properties)


def round_trip_message() -> ServiceBusMessage:
    """A message setting every property the pipeline uses, with a binary body and application properties of
    each simple type."""
    return ServiceBusMessage(
        bytes(range(256)),
        subject="analyse",
        correlation_id="corr-1",
        message_id="job-1",
        content_type="application/json",
        time_to_live=timedelta(minutes=5),
        application_properties={"traceparent": "00-abc-def-01", "attempt": 3, "ratio": 0.5, "flag": True},
    )


def assert_round_trip(received: ServiceBusReceivedMessage) -> None:
    """``received`` is :func:`round_trip_message` as first delivered in PEEK_LOCK, byte for byte."""
    assert b"".join(received.body) == bytes(range(256))
    assert received.subject == "analyse"
    assert received.correlation_id == "corr-1"
    assert received.message_id == "job-1"
    assert received.content_type == "application/json"
    assert received.time_to_live == timedelta(minutes=5)
    assert received.application_properties == {
        b"traceparent": b"00-abc-def-01",
        b"attempt": 3,
        b"ratio": 0.5,
        b"flag": True,
    }
    assert received.delivery_count == 0
    assert seq(received) > 0
    assert received.enqueued_time_utc is not None
    assert locked_until(received) > datetime.now(UTC)


def ttl_queue(dead_letter_on_expiry: bool) -> dict[str, dict[str, Any]]:
    return {"jobs": {"DeadLetteringOnMessageExpiration": dead_letter_on_expiry}}


def ttl_messages() -> list[ServiceBusMessage]:
    """One message that expires after a second, one that does not."""
    return [ServiceBusMessage("stale", time_to_live=timedelta(seconds=1)), ServiceBusMessage("fresh")]


def expired_dead_letters(dead_letter_on_expiry: bool) -> list[tuple[str, str]]:
    """The (body, reason) of the dead-letter queue once the stale message of :func:`ttl_messages` expired."""
    return [("stale", "TTLExpiredException")] if dead_letter_on_expiry else []
