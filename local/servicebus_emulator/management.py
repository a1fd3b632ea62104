"""The ``<entity>/$management`` request-response node: lock renewal, peek, schedule, deferred receive, settle.

A request is an AMQP message whose application property ``operation`` names the operation and whose body is a
value map; the response carries camelCase ``statusCode`` / ``statusDescription`` (and ``errorCondition`` on
failure) and a value map. Unknown operations answer 501 rather than hang the caller.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from azure.servicebus._pyamqp.types import AMQPTypes

from .codec import split_message
from .store import Outcome, Store, StoredMessage

__all__ = ["Response", "handle"]

_VENDOR = b"com.microsoft:"
_LOCK_LOST = b"com.microsoft:message-lock-lost"
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


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")


def _messages(messages: list[StoredMessage], *, with_tokens: bool) -> Response:
    if not messages:
        return Response(204, "No messages")
    items = []
    for message in messages:
        item: dict[str, Any] = {"message": message.encoded()}
        if with_tokens and message.lock_token is not None:
            item["lock-token"] = {_TYPE: AMQPTypes.uuid, _VALUE: message.lock_token}
        items.append(item)
    return Response(200, "OK", {"messages": items})


def _tokens(body: dict[bytes, Any]) -> list[uuid.UUID]:
    return [t if isinstance(t, uuid.UUID) else uuid.UUID(bytes=bytes(t)) for t in body.get(b"lock-tokens") or []]


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
        return Response(400, "Unknown disposition-status.", condition=_VENDOR + b"argument-error")
    reason, description = _text(body.get(b"deadletter-reason")), _text(body.get(b"deadletter-description"))
    tokens = _tokens(body)
    if not target.store.settle_all(target.entity, tokens, outcome, target.now, reason, description):
        return _lost(tokens)
    return Response(200, "OK", {})


def _schedule(target: Target, body: dict[bytes, Any]) -> Response:
    queue = target.store.queues[target.queue_name]
    numbers = []
    for item in body.get(b"messages") or []:
        seq = target.store.enqueue(queue, split_message(bytes(item[b"message"])), target.now)
        numbers.append({_TYPE: AMQPTypes.long, _VALUE: seq if seq is not None else -1})
    return Response(200, "OK", {"sequence-numbers": {_TYPE: AMQPTypes.array, _VALUE: numbers}})


def handle(target: Target, operation: bytes, body: Any) -> Response:
    body = body if isinstance(body, dict) else {}
    if target.entity != target.queue_name and operation in (_VENDOR + b"schedule-message",):
        return Response(400, "Cannot schedule messages on a dead-letter queue.", condition=_VENDOR + b"argument-error")
    if operation == _VENDOR + b"renew-lock":
        return _renew(target, body)
    if operation == _VENDOR + b"peek-message":
        count = int(body.get(b"message-count") or 1)
        messages = target.store.peek(target.entity, int(body.get(b"from-sequence-number") or 0), count)
        return _messages(messages, with_tokens=False)
    if operation == _VENDOR + b"update-disposition":
        return _settle(target, body)
    if operation == _VENDOR + b"schedule-message":
        return _schedule(target, body)
    if operation == _VENDOR + b"cancel-scheduled-message":
        target.store.cancel_scheduled(target.entity, [int(n) for n in body.get(b"sequence-numbers") or []])
        return Response(200, "OK", {})
    if operation == _VENDOR + b"receive-by-sequence-number":
        seqs = [int(n) for n in body.get(b"sequence-numbers") or []]
        delete = body.get(b"receiver-settle-mode") == 0
        messages = target.store.lock_deferred(target.entity, seqs, target.lock_ms, target.now, delete=delete)
        if len(messages) < len(seqs):
            return Response(404, "Some deferred messages were not found.", condition=_VENDOR + b"message-not-found")
        return _messages(messages, with_tokens=not delete)
    return Response(
        501, f"Operation {_text(operation)!r} is not supported by the emulator.", condition=b"amqp:not-implemented"
    )
