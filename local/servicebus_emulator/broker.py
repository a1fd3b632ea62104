"""The broker: resolves link addresses to queues and nodes, moves messages between links and the store.

Everything runs on one asyncio event loop. Handlers mutate the store inside an open transaction, queue replies on
their own connection and mark the entities that may have messages to deliver (:meth:`Broker.wake`);
:meth:`Broker.flush` delivers to the woken entities' receivers, commits, then writes, so a reply never precedes the
durable state it confirms. Because no handler writes to another connection, a turn that fails can be undone whole
(:meth:`Broker.abort`) with nothing of it sent anywhere. A 100 ms timer expires locks and TTLs and releases
scheduled messages.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from azure.servicebus._pyamqp import _decode, _encode
from azure.servicebus._pyamqp.endpoints import Source, Target
from azure.servicebus._pyamqp.error import AMQPError
from azure.servicebus._pyamqp.message import Message, Properties
from azure.servicebus._pyamqp.outcomes import Accepted, Modified, Rejected, Released
from azure.servicebus._pyamqp.performatives import AttachFrame, DetachFrame, DispositionFrame

from . import cbs, frames, management
from .codec import split_message
from .config import EmulatorConfig, QueueConfig
from .session import Link, LinkKind, Session
from .store import DLQ_SUFFIX, Outcome, Store, StoredMessage

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Broker"]

_LOGGER = logging.getLogger(__name__)
BATCH_FORMAT = 0x80013700
_LINK_CREDIT = 1000
_DISPATCH_CHUNK = 100
_SWEEP_SECONDS = 0.1
_LOCK_LOST = b"com.microsoft:message-lock-lost"
_LOCK_LOST_TEXT = (
    "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue."
)
_SESSION_FILTER = b"com.microsoft:session-filter"
_SESSIONS_REFUSED = (
    "A sessionful message receiver cannot be created on an entity that does not require sessions"
    " (the emulator does not support sessions)."
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _path(address: Any) -> str:
    text = address.decode("utf-8") if isinstance(address, bytes) else str(address or "")
    if "://" in text:
        text = urlparse(text).path
    return text.strip("/")


def _not_found(path: str) -> AMQPError:
    return AMQPError(condition=b"amqp:not-found", description=f"The messaging entity '{path}' could not be found.")


def _wants_session(source: Any) -> bool:
    """A session receiver asks for a session in its source's filter set (``com.microsoft:session-filter``)."""
    filters = source[7] if isinstance(source, list) and len(source) > 7 else None
    return isinstance(filters, dict) and _SESSION_FILTER in filters


def _outcome(state: Any) -> tuple[Outcome, str, str, Any]:
    """Map a receiver's delivery state to (outcome, dead-letter reason, description, state to echo)."""
    if not isinstance(state, dict) or "accepted" in state:
        return Outcome.COMPLETE, "", "", Accepted()
    if "released" in state:
        return Outcome.RELEASE, "", "", Released()
    if "modified" in state:
        failed, undeliverable = [*(state["modified"] or []), None, None][:2]
        echo = frames.make(Modified, delivery_failed=failed, undeliverable_here=undeliverable)
        if undeliverable:
            return Outcome.DEFER, "", "", echo
        return (Outcome.ABANDON if failed else Outcome.RELEASE), "", "", echo
    if "rejected" in state:
        error = (state["rejected"] or [None])[0] or []
        info = error[2] if len(error) > 2 and isinstance(error[2], dict) else {}

        def text(key: bytes) -> str:
            value = info.get(key)
            return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")

        return (
            Outcome.DEAD_LETTER,
            text(b"DeadLetterReason"),
            text(b"DeadLetterErrorDescription"),
            frames.make(Rejected),
        )
    return Outcome.RELEASE, "", "", Released()


class Broker:
    def __init__(self, config: EmulatorConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.connections: set[Connection] = set()
        self.dirty: set[Connection] = set()
        self._entities: dict[str, tuple[str, QueueConfig]] = {}
        for queue in config.queues:
            self._entities[queue.name.lower()] = (queue.name, queue)
            self._entities[(queue.name + DLQ_SUFFIX).lower()] = (queue.name + DLQ_SUFFIX, queue)
        self._consumers: dict[str, list[Link]] = {}
        self._woken: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.record_definitions(now_ms())
        self.store.recover()
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        self.store.close()

    def wake(self, entity: str) -> None:
        """The entity may have deliverable messages or receivers with new credit: dispatch at the next flush."""
        self._woken.add(entity)

    def flush(self) -> None:
        """End of an event-loop turn: deliver to woken entities, commit, then write every buffered frame."""
        while self._woken:
            self.dispatch(self._woken.pop())
        self.store.commit()
        dirty, self.dirty = self.dirty, set()
        for connection in dirty:
            connection.flush()

    def abort(self) -> None:
        """Undo the turn's uncommitted store changes (a frame failed half-way); its replies are the caller's."""
        self.store.rollback()

    def _sweep(self) -> None:
        try:
            for entity in self.store.sweep(now_ms()):
                self.wake(entity)
            self.flush()
        except BaseException:
            self.abort()
            raise
        finally:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_SECONDS, self._sweep)

    # -- links ----------------------------------------------------------------------------------------------------
    def _resolve(self, path: str) -> tuple[LinkKind, str | None, QueueConfig | None]:
        if path.lower() == "$cbs":
            return LinkKind.CBS, None, None
        kind = LinkKind.QUEUE
        if path.lower().endswith("/$management"):
            kind, path = LinkKind.MANAGEMENT, path[: -len("/$management")]
        found = self._entities.get(path.lower())
        return (kind, found[0], found[1]) if found else (kind, None, None)

    def attach(self, session: Session, fields: list[Any]) -> None:
        name, handle, role, snd_mode, rcv_mode, source, target = fields[:7]
        peer_receives = bool(role)
        endpoint = source if peer_receives else target
        path = _path(endpoint[0] if endpoint else None)
        kind, entity, queue = self._resolve(path)
        connection = session.connection
        # A session receiver is refused as AMQP refuses a link: an attach without its terminus (no source), then a
        # closing detach with the error, which the SDK raises while it opens the receiver.
        refused = peer_receives and kind is LinkKind.QUEUE and entity is not None and _wants_session(source)
        connection.send(
            session,
            frames.make(
                AttachFrame,
                name=name,
                handle=handle,
                role=not peer_receives,
                send_settle_mode=snd_mode,
                rcv_settle_mode=rcv_mode,
                source=frames.make(Source, address=source[0]) if source and not refused else None,
                target=frames.make(Target, address=target[0]) if target else None,
                initial_delivery_count=0 if peer_receives else None,
                # what a sender may send: the queue's limit, which the SDK checks before sending; none on a node
                max_message_size=queue.max_message_size if queue and kind is LinkKind.QUEUE else None,
            ),
        )
        link = Link(
            session=session,
            name=name,
            handle=handle,
            remote_handle=handle,
            address=path,
            kind=kind,
            entity=entity,
            outgoing=peer_receives,
            snd_settle_mode=snd_mode,
            rcv_settle_mode=rcv_mode,
        )
        if refused:
            _LOGGER.info("refused a session receiver on %r", path, extra={"action": "refuse-session"})
            error = AMQPError(condition=b"amqp:not-allowed", description=_SESSIONS_REFUSED)
            connection.send(session, frames.make(DetachFrame, handle=handle, closed=True, error=error))
            return
        if kind is not LinkKind.CBS and entity is None:
            self._refuse_unknown(link)
            if peer_receives and kind is LinkKind.QUEUE:
                return
        session.links[handle] = link
        if peer_receives:
            if kind is LinkKind.QUEUE:
                self._consumers.setdefault(link.entity or "", []).append(link)
        else:
            link.delivery_count = fields[9] or 0
            link.credit_granted = _LINK_CREDIT
            connection.send_flow(session, link, credit=_LINK_CREDIT)

    def _refuse_unknown(self, link: Link) -> None:
        """An unknown entity: what the service answers is ``amqp:not-found``, raised by the SDK as
        MessagingEntityNotFoundError. The SDK only maps it where it looks for it: a receive link's closing detach,
        a rejected transfer (send) and a 404 management response (peek, schedule, ...). So a receive link is
        attached then detached at once, while send and management links stay attached and fail each request."""
        _LOGGER.info("link to unknown entity %r", link.address, extra={"action": "not-found"})
        if link.outgoing and link.kind is LinkKind.QUEUE:
            link.session.connection.send(
                link.session,
                frames.make(DetachFrame, handle=link.handle, closed=True, error=_not_found(link.address)),
            )

    def detach(self, link: Link) -> None:
        link.closed = True
        consumers = self._consumers.get(link.entity or "")
        if consumers and link in consumers:
            consumers.remove(link)
        session = link.session
        for delivery_id in [d for d, (owner, _) in session.unsettled.items() if owner is link]:
            del session.unsettled[delivery_id]

    def credit(self, link: Link) -> None:
        if link.kind is LinkKind.QUEUE and link.entity:
            self.wake(link.entity)
        else:
            self._send_replies(link)

    # -- messages in ----------------------------------------------------------------------------------------------
    def transfer(self, link: Link, fields: list[Any], payload: bytes) -> None:
        link.delivery_count += 1
        connection, session = link.session.connection, link.session
        if link.credit_granted < _LINK_CREDIT // 2:
            link.credit_granted = _LINK_CREDIT
            connection.send_flow(session, link, credit=_LINK_CREDIT)
        queue_link = link.kind is LinkKind.QUEUE
        state = self._enqueue(link, fields[3], payload) if queue_link else self._request(link, payload)
        if not fields[4]:  # the sender waits for our outcome
            connection.send(
                session,
                frames.make(DispositionFrame, role=True, first=fields[1], last=fields[1], settled=True, state=state),
            )

    def _enqueue(self, link: Link, message_format: int | None, payload: bytes) -> Any:
        entity = link.entity or ""
        if link.entity is None:
            return Rejected(error=_not_found(link.address))
        queue = self.store.queues.get(entity)
        if queue is None:
            error = AMQPError(condition=b"amqp:not-allowed", description=f"Cannot send to '{entity}'.")
            return Rejected(error=error)
        if len(payload) > queue.max_message_size:  # a batch counts whole, as on the service
            return Rejected(error=management.size_exceeded(len(payload), queue))
        try:  # decode every message of a batch before storing any: a batch is accepted or rejected whole
            bodies = (
                _decode.decode_payload(memoryview(payload)).data or [] if message_format == BATCH_FORMAT else [payload]
            )
            messages = [split_message(bytes(body)) for body in bodies]
        except (ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
            _LOGGER.warning("rejected an undecodable message on %s: %s", entity, exc, extra={"action": "reject"})
            return Rejected(error=AMQPError(condition=b"amqp:decode-error", description=str(exc)))
        now = now_ms()
        for message in messages:
            self.store.enqueue(queue, message, now)
        self.wake(entity)
        return Accepted()

    def _request(self, link: Link, payload: bytes) -> Any:
        request = _decode.decode_payload(memoryview(payload))
        props = request.application_properties or {}
        message_id = request.properties.message_id if request.properties else None
        if link.kind is LinkKind.CBS:
            status, description = cbs.handle(props.get(b"operation"))
            app: dict[str | bytes, Any] = {"status-code": status, "status-description": description}
            value = None
        elif link.entity is None:
            app = {
                "statusCode": 404,
                "statusDescription": f"The messaging entity '{link.address}' could not be found.",
                "errorCondition": {"TYPE": "SYMBOL", "VALUE": b"amqp:not-found"},
            }
            value = None
        else:
            entity = link.entity
            queue_name = entity[: -len(DLQ_SUFFIX)] if entity.endswith(DLQ_SUFFIX) else entity
            queue = self.store.queues[queue_name]
            target = management.Target(
                self.store, entity, queue_name, int(queue.lock_duration.total_seconds() * 1000), now_ms()
            )
            response = management.handle(target, props.get(b"operation") or b"", request.value)
            app = {"statusCode": response.status, "statusDescription": response.description}
            if response.condition:
                app["errorCondition"] = {"TYPE": "SYMBOL", "VALUE": response.condition}
            value = response.value
            self.wake(entity)
            self.wake(queue_name + DLQ_SUFFIX)
        reply = frames.make(
            Message,
            properties=frames.make(Properties, correlation_id=message_id),
            application_properties=app,
            value=value,
        )
        self._reply(link, bytes(_encode.encode_payload(bytearray(), reply)))
        return Accepted()

    def _reply(self, request_link: Link, payload: bytes) -> None:
        for link in request_link.session.links.values():
            if link.outgoing and link.address == request_link.address:
                link.replies.append(payload)
                self._send_replies(link)
                return
        _LOGGER.warning("no reply link for %s", request_link.address, extra={"action": "drop-reply"})

    def _send_replies(self, link: Link) -> None:
        while link.replies and link.credit > 0:
            payload = link.replies.popleft()
            link.session.connection.send_transfer(link, uuid.uuid4().bytes, payload, settled=True)
            link.credit -= 1
            link.delivery_count += 1

    # -- messages out ---------------------------------------------------------------------------------------------
    def dispatch(self, entity: str) -> None:
        """Deliver available messages to the entity's receivers that have credit, round robin."""
        links = [link for link in self._consumers.get(entity, ()) if link.credit > 0]
        if not links:
            return
        queue_name = entity[: -len(DLQ_SUFFIX)] if entity.endswith(DLQ_SUFFIX) else entity
        lock_ms = int(self.store.queues[queue_name].lock_duration.total_seconds() * 1000)
        now = now_ms()
        empty = False
        while links and not empty:
            for link in links:
                count = min(link.credit, _DISPATCH_CHUNK)
                if link.settled_mode:
                    messages = self.store.take_next(entity, count, now)
                else:
                    messages = self.store.lock_next(entity, count, lock_ms, now)
                for message in messages:
                    self._deliver(link, message)
                if len(messages) < count:
                    empty = True
                    break
            links = [link for link in links if link.credit > 0]
        for link in self._consumers.get(entity, ()):
            if link.drain and link.credit > 0:  # nothing left: use up the credit and say so
                link.delivery_count += link.credit
                link.credit = 0
                link.session.connection.send_flow(link.session, link, credit=0)

    def _deliver(self, link: Link, message: StoredMessage) -> None:
        payload = message.encoded(locked=not link.settled_mode)
        token = message.lock_token or uuid.uuid4()
        connection = link.session.connection
        delivery_id = connection.send_transfer(link, token.bytes_le, payload, settled=link.settled_mode)
        if not link.settled_mode:
            link.session.unsettled[delivery_id] = (link, token)
        link.credit -= 1
        link.delivery_count += 1

    # -- settlement -----------------------------------------------------------------------------------------------
    def disposition(self, session: Session, fields: list[Any]) -> None:
        role, first, last, settled, state = fields[:5]
        if not role:
            return  # a sender's disposition: our replies are pre-settled
        last = first if last is None else last
        ids = (
            range(first, last + 1)
            if last - first < 4096
            else sorted(d for d in session.unsettled if first <= d <= last)
        )
        outcome, reason, description, echo = _outcome(state)
        now = now_ms()
        woken: set[str] = set()
        lost = Rejected(error=AMQPError(condition=_LOCK_LOST, description=_LOCK_LOST_TEXT))
        for delivery_id in ids:
            entry = session.unsettled.pop(delivery_id, None)
            ok = False
            if entry is not None:
                link, token = entry
                entity = link.entity or ""
                ok = self.store.settle(entity, token, outcome, now, reason, description)
                if ok and outcome is not Outcome.COMPLETE:
                    woken.update((entity, entity + DLQ_SUFFIX))
            if not settled:  # the receiver waits for our outcome (rcv-settle-mode second)
                frame = frames.make(
                    DispositionFrame,
                    role=False,
                    first=delivery_id,
                    last=delivery_id,
                    settled=True,
                    state=echo if ok else lost,
                )
                session.connection.send(session, frame)
        for entity in woken:
            self.wake(entity)
