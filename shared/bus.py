"""Service Bus: the client (connection string locally, namespace + Entra credential in Azure) and the job publisher.

A job message's ``message_id`` is ``{job_id}:{generation}`` (:func:`shared.messages.message_id`), so the queue's
duplicate detection drops a retry of the same send within its window while a new generation always goes through;
the body is the JSON envelope of :mod:`shared.messages`; the W3C trace context of the current span rides in the
application properties. A send may be scheduled (``at``): the worker's retry with backoff is a scheduled message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import cast
from uuid import UUID

from azure.core.credentials import TokenCredential
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
    ServiceBusSender,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import ServiceBusError

from shared.errors import BusUnavailable, CropAIError
from shared.messages import CONTENT_TYPE, SUBJECT, JobMessage, decode, parse_message_id
from shared.reconciler import Letter
from shared.settings import Settings
from shared.telemetry import trace_properties

log = logging.getLogger(__name__)


def servicebus_client(settings: Settings, credential: TokenCredential | None = None) -> ServiceBusClient:
    if settings.servicebus_connection_string:
        return ServiceBusClient.from_connection_string(settings.servicebus_connection_string)
    from azure.identity import DefaultAzureCredential

    assert settings.servicebus_namespace, "Settings guarantees one of the two"
    return ServiceBusClient(settings.servicebus_namespace, credential or DefaultAzureCredential())


def job_message(message: JobMessage) -> ServiceBusMessage:
    return ServiceBusMessage(
        message.to_json(),
        message_id=message.message_id,
        content_type=CONTENT_TYPE,
        subject=SUBJECT,
        application_properties=trace_properties(),  # type: ignore[arg-type]  # dict[str, str] is accepted
    )


class JobPublisher:
    """Sends job messages, each to the queue of its priority (``queues``: priority -> queue name), on long-lived
    senders (opened on first use, reopened after a failure); thread-safe.

    ``timeout`` bounds one send, retries included. After a failed send, further sends fail at once for ``cooldown``
    seconds (:class:`BusUnavailable`) instead of each waiting out the timeout: the API answers quickly while the
    bus is down, and the jobs it accepted meanwhile are handed over by the reconciler.
    """

    def __init__(
        self, client: ServiceBusClient, queues: Mapping[str, str], *, timeout: float = 30.0, cooldown: float = 0.0
    ) -> None:
        self._client = client
        self._queues = dict(queues)
        self._timeout = timeout
        self._cooldown = cooldown
        self._senders: dict[str, ServiceBusSender] = {}
        self._lock = threading.Lock()
        self._failed_at = -float("inf")

    def send(self, message: JobMessage, *, at: datetime | None = None) -> None:
        """Send ``message`` now, or schedule it for ``at`` (an aware datetime), to its priority's queue."""
        queue = self._queues[message.priority]
        extra = {"job_id": str(message.job_id), "message_id": message.message_id, "action": "send", "queue": queue}
        with self._lock:
            if time.monotonic() - self._failed_at < self._cooldown:
                raise BusUnavailable("the bus failed a send a moment ago; not trying again yet")
            try:
                sender = self._senders.get(queue)
                if sender is None:
                    sender = self._senders[queue] = self._client.get_queue_sender(queue)
                if at is None:
                    sender.send_messages(job_message(message), timeout=self._timeout)
                else:
                    sender.schedule_messages(job_message(message), at, timeout=self._timeout)
            except ServiceBusError as e:
                self._failed_at = time.monotonic()
                self._close_senders()
                raise BusUnavailable(f"could not send to queue {queue!r}: {e}"[:1000]) from e
        if at is None:
            log.info("sent job %s (generation %d)", message.job_id, message.generation, extra=extra)
        else:
            log.info("scheduled job %s (generation %d) for %s", message.job_id, message.generation, at, extra=extra)

    def _close_senders(self) -> None:
        for sender in self._senders.values():
            try:
                sender.close()
            except ServiceBusError:
                log.debug("closing a failed sender failed too", exc_info=True)
        self._senders.clear()

    def close(self) -> None:
        with self._lock:
            self._close_senders()
        self._client.close()


class DeadLetterInbox:
    """The job queues' dead-letter sub-queues, received in peek-lock for :class:`shared.reconciler.Reconciler`:
    each letter is completed once it has been reconciled and recorded, so every run reads only new letters. A
    receiver per queue and run (``with DeadLetterInbox(...) as inbox``)."""

    def __init__(self, client: ServiceBusClient, queue_names: Sequence[str], *, max_wait_time: float = 1.0) -> None:
        self._client = client
        self._queue_names = list(queue_names)
        self._max_wait_time = max_wait_time
        self._receivers: dict[str, ServiceBusReceiver] = {}

    def __enter__(self) -> DeadLetterInbox:
        return self

    def __exit__(self, *exc: object) -> None:
        for receiver in self._receivers.values():
            try:
                receiver.close()
            except ServiceBusError:
                log.debug("closing a dead-letter receiver failed", exc_info=True)
        self._receivers.clear()

    def receive(self, max_count: int) -> list[Letter]:
        """Up to ``max_count`` letters, from the first queue that has some (high priority first)."""
        for queue in self._queue_names:
            try:
                receiver = self._receivers.get(queue)
                if receiver is None:
                    receiver = self._receivers[queue] = self._client.get_queue_receiver(
                        queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER
                    )
                received = receiver.receive_messages(max_message_count=max_count, max_wait_time=self._max_wait_time)
            except ServiceBusError as e:
                raise BusUnavailable(f"could not receive dead letters of {queue!r}: {e}"[:1000]) from e
            if received:
                return [_letter(m, receiver) for m in received]
        return []

    def complete(self, letter: Letter) -> None:
        message, receiver = cast(tuple[ServiceBusReceivedMessage, ServiceBusReceiver], letter.token)  # from _letter
        try:
            receiver.complete_message(message)
        except ServiceBusError as e:  # the lock ran out: the letter comes again and is reconciled as a no-op
            raise BusUnavailable(f"could not complete dead letter {letter.message_id}: {e}"[:1000]) from e


def _letter(message: ServiceBusReceivedMessage, receiver: ServiceBusReceiver) -> Letter:
    job: tuple[UUID, int] | None
    try:
        envelope = decode(b"".join(message.body))
        job = (envelope.job_id, envelope.generation)
    except (CropAIError, TypeError):  # undecodable: the message id names the job and generation by contract
        job = parse_message_id(str(message.message_id))
    return Letter(
        message_id=str(message.message_id),
        sequence_number=message.sequence_number or 0,
        job_id=job[0] if job else None,
        generation=job[1] if job else None,
        reason=message.dead_letter_reason,
        description=message.dead_letter_error_description,
        delivery_count=message.delivery_count,
        enqueued_at=message.enqueued_time_utc,
        token=(message, receiver),
    )
