"""The ``<entity>/$management`` request-response node: lock renewal, peek, schedule, deferred receive, settle.

A request is an AMQP message whose application property ``operation`` names the operation and whose body is a
value map; the response carries camelCase ``statusCode`` / ``statusDescription`` (and ``errorCondition`` on
failure) and a value map. Unknown operations answer 501 rather than hang the caller; a malformed request (a null
lock token, a sequence number that is no integer) answers 400 ``com.microsoft:argument-error``, as the service
does, and changes nothing: the connection and the other requests on it are unaffected.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any

from azure.servicebus._pyamqp.error import AMQPError
from azure.servicebus._pyamqp.types import AMQPTypes

from .codec import split_message
from .config import QueueConfig
from .store import Outcome, Store, StoredMessage

__all__ = ["Response", "handle", "size_exceeded"]

_VENDOR = b"com.microsoft:"
_LOCK_LOST = b"com.microsoft:message-lock-lost"
_ARGUMENT_ERROR = b"com.microsoft:argument-error"
_SIZE_EXCEEDED = b"amqp:link:message-size-exceeded"  # the SDK raises MessageSizeExceededError
_SETTLEMENTS = {
    b"completed": Outcome.COMPLETE,
    b"abandoned": Outcome.ABANDON,
    b"defered": Outcome.DEFER,
    b"deferred": Outcome.DEFER,
    b"suspended": Outcome.DEAD_LETTER,
}
_TYPE, _VALUE = "TYPE", "VALUE"


@dataclass(frozen=True)
class Response:
    status: int
    description: str
    value: Any = None
    condition: bytes | None = None


@dataclass(frozen=True)
class Target:
    """What a management request acts on: the entity, its lock duration and the clock."""

    store: Store
    entity: str  # "jobs" or "jobs/$DeadLetterQueue"
    queue_name: str  # the parent queue, whose properties apply
    lock_ms: int
    now: int


class _BadRequest(ValueError):
    """The request's body is malformed; answered 400 before anything changed."""


def size_exceeded(size: int, queue: QueueConfig) -> AMQPError:
    """What the service answers a message (or batch) larger than the queue's MaxMessageSizeInKilobytes."""
    description = (
        f"The received message (size {size} bytes) exceeds the limit ({queue.max_message_size} bytes) currently"
        f" allowed on the queue '{queue.name}'."
    )
    return AMQPError(condition=_SIZE_EXCEEDED, description=description)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")


def _messages(messages: list[StoredMessage], *, with_tokens: bool) -> Response:
    if not messages:
        return Response(204, "No messages")
    items = []
    for message in messages:
        item: dict[str, Any] = {"message": message.encoded(locked=with_tokens)}
        if with_tokens and message.lock_token is not None:
            item["lock-token"] = {_TYPE: AMQPTypes.uuid, _VALUE: message.lock_token}
        items.append(item)
    return Response(200, "OK", {"messages": items})


def _token(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        return uuid.UUID(bytes=bytes(value))
    raise _BadRequest(f"lock-tokens: {value!r} is not a lock token")


def _tokens(body: dict[bytes, Any]) -> list[uuid.UUID]:
    return [_token(value) for value in _list(body, b"lock-tokens")]


def _list(body: dict[bytes, Any], key: bytes) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _BadRequest(f"{key.decode()}: expected an array, got {value!r}")
    return value


def _int(value: Any, key: bytes) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadRequest(f"{key.decode()}: {value!r} is not an integer")
    return value


def _numbers(body: dict[bytes, Any]) -> list[int]:
    return [_int(value, b"sequence-numbers") for value in _list(body, b"sequence-numbers")]


def _lost(tokens: list[uuid.UUID]) -> Response:
    listed = ", ".join(str(token) for token in tokens)
    return Response(410, f"One of the locks ({listed}) is lost; nothing was changed.", condition=_LOCK_LOST)


def _renew(target: Target, body: dict[bytes, Any]) -> Response:
    """All or nothing, as the service: one lost lock fails the request and renews none of them."""
    tokens = _tokens(body)
    until = target.store.renew_all(target.entity, tokens, target.lock_ms, target.now)
    if until is None:
        return _lost(tokens)
    expirations = [{_TYPE: AMQPTypes.timestamp, _VALUE: until} for _ in tokens]
    return Response(200, "OK", {"expirations": {_TYPE: AMQPTypes.array, _VALUE: expirations}})


def _settle(target: Target, body: dict[bytes, Any]) -> Response:
    """All or nothing, as the service: one lost lock fails the request and settles none of them."""
    outcome = _SETTLEMENTS.get(bytes(body.get(b"disposition-status") or b""))
    if outcome is None:
        return Response(400, "Unknown disposition-status.", condition=_ARGUMENT_ERROR)
    reason, description = _text(body.get(b"deadletter-reason")), _text(body.get(b"deadletter-description"))
    tokens = _tokens(body)
    if not target.store.settle_all(target.entity, tokens, outcome, target.now, reason, description):
        return _lost(tokens)
    return Response(200, "OK", {})


def _schedule(target: Target, body: dict[bytes, Any]) -> Response:
    """All or nothing: every message is decoded and checked before any is stored."""
    queue = target.store.queues[target.queue_name]
    encoded = []
    for item in _list(body, b"messages"):
        message = item.get(b"message") if isinstance(item, dict) else None
        if not isinstance(message, bytes):
            raise _BadRequest("messages: an item without a message")
        if len(message) > queue.max_message_size:
            error = size_exceeded(len(message), queue)
            return Response(400, str(error.description), condition=error.condition)
        encoded.append(message)
    try:
        parts = [split_message(message) for message in encoded]
    except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise _BadRequest(f"messages: undecodable message: {exc}") from exc
    numbers = []
    for part in parts:
        seq = target.store.enqueue(queue, part, target.now)
        numbers.append({_TYPE: AMQPTypes.long, _VALUE: seq if seq is not None else -1})
    return Response(200, "OK", {"sequence-numbers": {_TYPE: AMQPTypes.array, _VALUE: numbers}})


def _receive_deferred(target: Target, body: dict[bytes, Any]) -> Response:
    """All or nothing, as the service: when one of the messages is not deferred, none of them is locked."""
    seqs = list(dict.fromkeys(_numbers(body)))
    delete = body.get(b"receiver-settle-mode") == 0
    if target.store.count_deferred(target.entity, seqs) < len(seqs):
        return Response(404, "Some deferred messages were not found.", condition=_VENDOR + b"message-not-found")
    messages = target.store.lock_deferred(target.entity, seqs, target.lock_ms, target.now, delete=delete)
    return _messages(messages, with_tokens=not delete)


def handle(target: Target, operation: bytes, body: Any) -> Response:
    try:
        return _dispatch(target, operation, body if isinstance(body, dict) else {})
    except _BadRequest as exc:
        return Response(400, f"Malformed {_text(operation)!r} request: {exc}", condition=_ARGUMENT_ERROR)


def _dispatch(target: Target, operation: bytes, body: dict[bytes, Any]) -> Response:
    if target.entity != target.queue_name and operation in (_VENDOR + b"schedule-message",):
        return Response(400, "Cannot schedule messages on a dead-letter queue.", condition=_ARGUMENT_ERROR)
    if operation == _VENDOR + b"renew-lock":
        return _renew(target, body)
    if operation == _VENDOR + b"peek-message":
        count = _int(body.get(b"message-count") or 1, b"message-count")
        start = _int(body.get(b"from-sequence-number") or 0, b"from-sequence-number")
        return _messages(target.store.peek(target.entity, start, count), with_tokens=False)
    if operation == _VENDOR + b"update-disposition":
        return _settle(target, body)
    if operation == _VENDOR + b"schedule-message":
        return _schedule(target, body)
    if operation == _VENDOR + b"cancel-scheduled-message":
        target.store.cancel_scheduled(target.entity, _numbers(body))
        return Response(200, "OK", {})
    if operation == _VENDOR + b"receive-by-sequence-number":
        return _receive_deferred(target, body)
    return Response(
        501, f"Operation {_text(operation)!r} is not supported by the emulator.", condition=b"amqp:not-implemented"
    )
