"""A received message as the function sees it: the ``azure.functions.ServiceBusMessage`` the Python worker builds.

The host hands the worker the message body and the trigger's binding data (``ServiceBusTriggerBindingStrategy`` of
the Service Bus extension 5.x) as typed data, and the worker's ``ServiceBusMessageInConverter`` turns them into the
``func.ServiceBusMessage``. Here the same binding data is made from the SDK's message, typed as the host types it
(strings as strings; numbers, dictionaries and dates as JSON, dates in Json.NET's format), and the worker's own
converter decodes it, so every property and ``metadata`` come out as in Azure:

- the body is the message's bytes;
- ``delivery_count`` counts this delivery (1 the first time), as .NET does (the AMQP header counts prior attempts);
- ``enqueued_time_utc`` and ``expires_at_utc`` are naive datetimes holding UTC (the host sends ``DateTime`` values
  without an offset); ``expires_at_utc`` is 9999-12-31 for a message without a time to live;
- ``application_properties`` and ``user_properties`` are the same dictionary (string values; binary ones in base64);
- ``subject`` and ``label`` are the subject; ``lock_token`` is the lock token as a string;
- ``locked_until``, ``time_to_live``, ``state``, ``dead_letter_reason``, ``dead_letter_error_description``,
  ``scheduled_enqueue_time_utc`` and ``enqueued_sequence_number`` are None: the host does not send them.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import azure.functions as func
from azure.functions.meta import Datum
from azure.functions.servicebus import ServiceBusMessageInConverter
from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus.amqp import AmqpMessageBodyType

_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)  # .NET's DateTimeOffset.MaxValue, to the microsecond


def net_datetime(moment: datetime) -> str:
    """Json.NET's ISO format: a ``DateTimeOffset`` (an aware ``moment``, in UTC) or a ``DateTime`` (a naive one)."""
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    fraction = f"{utc.microsecond:06d}{9 if utc == _MAX else 0}".rstrip("0")  # up to 7 digits, trailing zeros cut
    text = utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "")
    return text + ("+00:00" if moment.tzinfo else "")


def _property(value: Any) -> Any:
    """An application property as Json.NET writes it. The SDK's AMQP decoder returns strings and binaries alike as
    bytes: UTF-8 ones are taken for strings, others for ``byte[]`` (base64)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return net_datetime(value)
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def body_of(message: ServiceBusReceivedMessage) -> bytes:
    if message.body_type == AmqpMessageBodyType.DATA:
        return b"".join(message.body)
    value = _property(message.body) if message.body_type == AmqpMessageBodyType.VALUE else list(message.body)
    return value.encode("utf-8") if isinstance(value, str) else json.dumps(value, default=_property).encode("utf-8")


def delivery_count(message: ServiceBusReceivedMessage) -> int:
    """This delivery's number, 1 for the first, as .NET's ``DeliveryCount`` (the AMQP header's + 1)."""
    header = message.raw_amqp_message.header
    return (header.delivery_count or 0) + 1 if header is not None else 1


def binding_data(message: ServiceBusReceivedMessage) -> dict[str, Any]:
    """The trigger's binding data for one message, named and typed as the extension's (a naive datetime is a .NET
    ``DateTime``, an aware one a ``DateTimeOffset``); None values are not sent."""
    enqueued = message.enqueued_time_utc or datetime.now(UTC)
    expires = message.expires_at_utc or _MAX
    annotations = message.raw_amqp_message.annotations or {}
    properties = {_property(key): _property(value) for key, value in (message.application_properties or {}).items()}
    data = {
        "DeliveryCount": delivery_count(message),
        "DeadLetterSource": message.dead_letter_source,
        "LockToken": str(message.lock_token) if message.lock_token else None,
        "ExpiresAtUtc": expires.replace(tzinfo=None),
        "ExpiresAt": expires,
        "EnqueuedTimeUtc": enqueued.replace(tzinfo=None),
        "EnqueuedTime": enqueued,
        "MessageId": message.message_id,
        "ContentType": message.content_type,
        "ReplyTo": message.reply_to,
        "SequenceNumber": message.sequence_number,
        "To": message.to,
        "Subject": message.subject,
        "Label": message.subject,
        "CorrelationId": message.correlation_id,
        "ApplicationProperties": properties,
        "UserProperties": properties,
        "SessionId": message.session_id,
        "ReplyToSessionId": message.reply_to_session_id,
        "PartitionKey": message.partition_key,
        "TransactionPartitionKey": _property(annotations.get(b"x-opt-via-partition-key")),
    }
    return {key: value for key, value in data.items() if value is not None}


def _datum(value: Any) -> Datum:
    """The host's typed data: a string stays a string, anything else goes as JSON (``ToRpcDefault``)."""
    if isinstance(value, str):
        return Datum(value, "string")
    return Datum(json.dumps(net_datetime(value) if isinstance(value, datetime) else value), "json")


def function_message(message: ServiceBusReceivedMessage) -> func.ServiceBusMessage:
    """The ``func.ServiceBusMessage`` the Python worker would pass for ``message``."""
    metadata = {key: _datum(value) for key, value in binding_data(message).items()}
    decoded = ServiceBusMessageInConverter.decode(Datum(body_of(message), "bytes"), trigger_metadata=metadata)
    assert isinstance(decoded, func.ServiceBusMessage), "UserProperties makes it a single message"
    return decoded
