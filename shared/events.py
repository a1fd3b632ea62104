"""Webhook events: the outbox rows (``job_events``) the lifecycle's notifying events write, handed to the job-events
queue by whoever made the transition (:class:`Notifier`), and swept by the reconciler when that hand-over failed.

* :class:`EventStore` (PostgreSQL): the unsent events, the hand-over mark, one event joined with its job's callback
  (:class:`Delivery`), each delivery attempt, and the summary the status view shows;
* :class:`BusEventSender`: one message per delivery attempt on the job-events queue, body
  ``{"event_id", "attempt"}``, ``message_id`` ``{event_id}:{attempt}`` (a retried send of the same attempt is dropped
  by duplicate detection; the next attempt is a new id; an attempt put off while the database is down is
  ``{event_id}:{attempt}:p{n}``), trace context in the application properties;
* :class:`OutboxNotifier`: :meth:`~OutboxNotifier.flush` sends a job's unsent events as attempt 1 and marks them
  sent, never raising (a failure is logged and left to the reconciler's :meth:`~OutboxNotifier.sweep`). Two racing
  flushes send the same message id twice: the queue keeps one. :meth:`~OutboxNotifier.resume` (the reconciler's
  too) sends again the next attempt's message of a pending event whose message never came (``next_attempt_at`` long
  past: its message was dead-lettered, or its send failed on every delivery), as ``{event_id}:{attempt}:r{n}``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender
from azure.servicebus.exceptions import ServiceBusError
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.db import translated
from shared.errors import BusUnavailable, CropAIError, InvalidMessage
from shared.jobs import Job
from shared.telemetry import trace_properties

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
SUBJECT = "job-event"


class Notifier(Protocol):
    def flush(self, job: Job) -> None:
        """Hand the job's unsent events to the job-events queue; never raises (the reconciler sweeps what is left).
        A job without a callback has no events (:func:`shared.lifecycle.statement` writes none): nothing to do."""
        ...


class Outbox(Notifier, Protocol):
    def sweep(self, older_than: timedelta, limit: int) -> int:
        """Hand over events of any job left unsent for ``older_than``; how many. Raises when a backend is down."""
        ...

    def resume(self, older_than: timedelta, limit: int) -> int:
        """Send again the next attempt's message of pending events whose message was due ``older_than`` ago and
        never came (stalled deliveries); how many. Raises when a backend is down."""
        ...


class Event(BaseModel):
    """A ``job_events`` row, as far as handing it over needs."""

    model_config = ConfigDict(frozen=True)

    event_id: UUID
    job_id: UUID
    type: str
    created_at: datetime


class Delivery(Event):
    """An event with what one delivery attempt needs: the payload, its job's callback and secret, and its result."""

    payload: dict[str, Any]
    attempts: int  # POSTs made so far
    next_attempt: int = 1  # the attempt whose message is expected next (the one after the last recorded)
    next_attempt_at: datetime | None = None  # when that message is due; None: none is expected
    delivered_at: datetime | None = None
    gave_up_at: datetime | None = None
    callback_url: str | None = None
    webhook_secret: str | None = None
    result: dict[str, Any] | None = None  # the job's stored result (a succeeded job)


class Stalled(Event):
    """A pending event whose next attempt's message never came: which attempt, and how often it was sent again."""

    next_attempt: int
    resends: int


class EventMessage(BaseModel):
    """The body of a job-events message: which event, which delivery attempt (1 = the first)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: UUID
    attempt: int = Field(ge=1)
    postponed: int = Field(0, ge=0)  # times this attempt was put off because the database was down
    resent: int = Field(0, ge=0)  # the reconciler's n-th sending of a stalled event's next attempt (0: not one)

    @property
    def message_id(self) -> str:
        resent = f":r{self.resent}" if self.resent else ""
        postponed = f":p{self.postponed}" if self.postponed else ""
        return f"{self.event_id}:{self.attempt}{resent}{postponed}"

    @classmethod
    def decode(cls, body: bytes) -> EventMessage:
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            raise InvalidMessage(f"not a job-events message: {e.errors()[:1]}") from e


_DELIVERY = """
    SELECT e.event_id, e.job_id, e.type, e.created_at, e.payload, e.attempts, e.next_attempt, e.next_attempt_at,
           e.delivered_at, e.gave_up_at, j.callback_url, j.webhook_secret, r.result
    FROM job_events e JOIN jobs j USING (job_id) LEFT JOIN results r USING (job_id)
    WHERE e.event_id = %s
"""
_RECORD = """
    UPDATE job_events SET attempts = attempts + 1, last_status = %(status)s, last_error = %(error)s,
        last_attempt_at = now(), sent_at = coalesce(sent_at, now()),
        next_attempt = greatest(next_attempt, %(attempt)s + 1),
        next_attempt_at = CASE WHEN %(next_at)s::timestamptz IS NULL THEN NULL
                               WHEN %(attempt)s + 1 >= next_attempt THEN %(next_at)s ELSE next_attempt_at END,
        delivered_at = CASE WHEN %(delivered)s THEN coalesce(delivered_at, now()) ELSE delivered_at END,
        gave_up_at = CASE WHEN %(delivered)s THEN NULL WHEN %(gave_up)s THEN coalesce(gave_up_at, now())
                          ELSE gave_up_at END
    WHERE event_id = %(event_id)s RETURNING event_id
"""
_SUMMARY = """
    SELECT j.callback_url AS url, j.callback_events AS events, count(e.event_id) AS deliveries,
           coalesce(sum(e.attempts), 0) AS attempts,
           (SELECT last_status FROM job_events l WHERE l.job_id = j.job_id AND l.last_attempt_at IS NOT NULL
            ORDER BY l.last_attempt_at DESC LIMIT 1) AS last_status,
           max(e.last_attempt_at) AS last_attempt_at,
           count(e.delivered_at) AS delivered,
           count(e.event_id) FILTER (WHERE e.delivered_at IS NULL AND e.gave_up_at IS NULL) AS pending,
           count(e.gave_up_at) FILTER (WHERE e.delivered_at IS NULL) AS gave_up
    FROM jobs j LEFT JOIN job_events e USING (job_id)
    WHERE j.job_id = %s AND j.callback_url IS NOT NULL
    GROUP BY j.job_id
"""


class EventStore:
    """``job_events`` on PostgreSQL. Driver errors that mean "the database is not there" become
    :class:`~shared.errors.DatabaseUnavailable`, as in :class:`shared.db.PostgresJobStore`."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def _rows(self, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> list[dict[str, Any]]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(sql, params).fetchall()

    @translated
    def unsent(self, job_id: UUID | None, older_than: timedelta, limit: int) -> list[Event]:
        """Events not handed over yet (of ``job_id``, or of any job), created at least ``older_than`` ago, oldest
        first. An event the deliverer has seen counts as handed over (its first attempt marks it)."""
        rows = self._rows(
            "SELECT event_id, job_id, type, created_at FROM job_events WHERE sent_at IS NULL"
            " AND created_at <= now() - %s AND (%s::uuid IS NULL OR job_id = %s) ORDER BY created_at LIMIT %s",
            (older_than, job_id, job_id, limit),
        )
        return [Event.model_validate(row) for row in rows]

    @translated
    def mark_sent(self, event_id: UUID) -> None:
        """The event's first attempt was handed over: its message is due now (unless an attempt was recorded)."""
        self._rows(
            "UPDATE job_events SET sent_at = coalesce(sent_at, now()), next_attempt_at = CASE WHEN attempts = 0"
            " THEN coalesce(next_attempt_at, now()) ELSE next_attempt_at END WHERE event_id = %s RETURNING event_id",
            (event_id,),
        )

    @translated
    def stalled(self, older_than: timedelta, limit: int) -> list[Stalled]:
        """Pending events (neither delivered nor given up) whose next attempt's message was due at least
        ``older_than`` ago, longest overdue first."""
        rows = self._rows(
            "SELECT event_id, job_id, type, created_at, next_attempt, resends FROM job_events"
            " WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= now() - %s"
            " ORDER BY next_attempt_at LIMIT %s",
            (older_than, limit),
        )
        return [Stalled.model_validate(row) for row in rows]

    @translated
    def mark_resent(self, event_id: UUID, attempt: int) -> None:
        """The message of ``attempt`` was sent again: due now (unless that attempt was made meanwhile)."""
        self._rows(
            "UPDATE job_events SET next_attempt_at = now(), resends = resends + 1 WHERE event_id = %s"
            " AND next_attempt = %s AND delivered_at IS NULL AND gave_up_at IS NULL RETURNING event_id",
            (event_id, attempt),
        )

    @translated
    def delivery(self, event_id: UUID) -> Delivery | None:
        rows = self._rows(_DELIVERY, (event_id,))
        return Delivery.model_validate(rows[0]) if rows else None

    @translated
    def record_attempt(
        self,
        event_id: UUID,
        attempt: int,
        *,
        status: int | None,
        error: str | None,
        delivered: bool,
        gave_up: bool,
        next_at: datetime | None = None,
    ) -> None:
        """One POST of attempt ``attempt`` (its HTTP status, or the error when there was no response);
        ``delivered``: a 2xx; ``gave_up``: no attempt follows; ``next_at``: when the next attempt's message is due
        (``None``: none follows). A delivery clears an earlier give-up (a redelivery that got through). The next
        attempt expected becomes ``attempt + 1`` (never goes back: a late copy of an older attempt changes neither)."""
        params = {"event_id": event_id, "attempt": attempt, "status": status, "error": error and error[:1000],
                  "delivered": delivered, "gave_up": gave_up, "next_at": next_at}  # fmt: skip
        self._rows(_RECORD, params)

    @translated
    def summary(self, job_id: UUID) -> dict[str, Any] | None:
        """The webhook part of the job's status view, or ``None`` when the job has no callback."""
        rows = self._rows(_SUMMARY, (job_id,))
        if not rows:
            return None
        row = rows[0]
        last = row["last_attempt_at"]
        return {
            **row,
            "url": redacted(row["url"]),
            "events": row["events"] or ["completed"],
            "last_attempt_at": last.isoformat() if last else None,
        }


def redacted(url: str) -> str:
    """``url`` as the status view shows it: ``scheme://host[:port]`` only. Its path and query may carry the
    receiver's token, and its user info is never stored (submit refuses it) but would not be shown either."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))


class EventSender(Protocol):
    def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
        """Send ``message`` now, or schedule it for ``at``; raises :class:`~shared.errors.BusUnavailable`."""
        ...


class BusEventSender:
    """Messages on the job-events queue, on one long-lived sender (reopened after a failure); thread-safe.

    ``timeout`` bounds one send, retries included. After a failed send, further sends fail at once for ``cooldown``
    seconds (:class:`~shared.errors.BusUnavailable`) instead of each waiting out the timeout, as
    :class:`shared.bus.JobPublisher` does: a worker's flushes (after a claim, a stage change, a settlement) cost
    nothing while the bus is down, and the reconciler sweeps the events they leave unsent.
    """

    def __init__(self, client: ServiceBusClient, queue: str, *, timeout: float = 10.0, cooldown: float = 0.0) -> None:
        self._client = client
        self._queue = queue
        self._timeout = timeout
        self._cooldown = cooldown
        self._sender: ServiceBusSender | None = None
        self._lock = threading.Lock()
        self._failed_at = -float("inf")

    def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
        sb_message = ServiceBusMessage(
            message.model_dump_json(exclude_defaults=True),
            message_id=message.message_id,
            content_type=CONTENT_TYPE,
            subject=SUBJECT,
            application_properties=trace_properties(),  # type: ignore[arg-type]  # dict[str, str] is accepted
        )
        with self._lock:
            if time.monotonic() - self._failed_at < self._cooldown:
                raise BusUnavailable(f"a send to queue {self._queue!r} failed a moment ago; not trying again yet")
            try:
                if self._sender is None:
                    self._sender = self._client.get_queue_sender(self._queue)
                if at is None:
                    self._sender.send_messages(sb_message, timeout=self._timeout)
                else:
                    self._sender.schedule_messages(sb_message, at, timeout=self._timeout)
            except ServiceBusError as e:
                self._failed_at = time.monotonic()
                self._close_sender()
                raise BusUnavailable(f"could not send to queue {self._queue!r}: {e}"[:1000]) from e

    def _close_sender(self) -> None:
        if self._sender is not None:
            try:
                self._sender.close()
            except ServiceBusError:
                log.debug("closing a failed sender failed too", exc_info=True)
            self._sender = None

    def close(self) -> None:
        with self._lock:
            self._close_sender()


class OutboxNotifier:
    """:class:`Outbox` on the event store and the job-events queue (``batch``: events handed over per call)."""

    def __init__(self, events: EventStore, sender: EventSender, *, batch: int = 100) -> None:
        self._events = events
        self._sender = sender
        self._batch = batch

    def flush(self, job: Job) -> None:
        if job.callback_url is None:
            return  # no query: its events are never written
        job_id = job.job_id
        try:
            self._hand_over(self._events.unsent(job_id, timedelta(0), self._batch), "flush")
        except Exception as e:  # the contract: never raise; what is left unsent, the reconciler sweeps
            extra = {"job_id": str(job_id), "action": "flush_failed"}
            log.warning("job %s: webhook events not handed over: %s", job_id, e, extra=extra,
                        exc_info=not isinstance(e, CropAIError))  # fmt: skip

    def sweep(self, older_than: timedelta, limit: int) -> int:
        return self._hand_over(self._events.unsent(None, older_than, limit), "sweep")

    def resume(self, older_than: timedelta, limit: int) -> int:
        stalled = self._events.stalled(older_than, limit)
        for event in stalled:
            message = EventMessage(event_id=event.event_id, attempt=event.next_attempt, resent=event.resends + 1)
            self._sender.send(message)
            self._events.mark_resent(event.event_id, event.next_attempt)
            extra = {"job_id": str(event.job_id), "message_id": message.message_id, "action": "webhook_resumed"}
            log.warning("job %s: %s attempt %d never came; sent again", event.job_id, event.type, event.next_attempt,
                        extra=extra)  # fmt: skip
        return len(stalled)

    def _hand_over(self, events: list[Event], action: str) -> int:
        for event in events:
            message = EventMessage(event_id=event.event_id, attempt=1)
            self._sender.send(message)
            self._events.mark_sent(event.event_id)
            extra = {"job_id": str(event.job_id), "message_id": message.message_id, "action": action}
            log.info("job %s: %s handed over (%s)", event.job_id, event.type, action, extra=extra)
        return len(events)


def open_notifier(
    pool: ConnectionPool, client: ServiceBusClient, queue: str, *, timeout: float = 10.0, cooldown: float = 10.0
) -> OutboxNotifier:
    """The notifier a worker uses: the event store on ``pool``, the job-events ``queue`` through ``client``; after a
    failed send, its flushes fail at once for ``cooldown`` seconds (the reconciler sweeps what they leave)."""
    return OutboxNotifier(EventStore(pool), BusEventSender(client, queue, timeout=timeout, cooldown=cooldown))
