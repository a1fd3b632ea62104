"""Typed accessors for received messages: the SDK types these optional, a broker always sets them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage

Received = list[ServiceBusReceivedMessage]


def seq(message: ServiceBusReceivedMessage) -> int:
    assert message.sequence_number is not None
    return message.sequence_number


def locked_until(message: ServiceBusReceivedMessage) -> datetime:
    assert message.locked_until_utc is not None
    return message.locked_until_utc


def app_properties(message: ServiceBusReceivedMessage) -> dict[Any, Any]:
    assert message.application_properties is not None
    return dict(message.application_properties)
