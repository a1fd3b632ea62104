"""Receive -> dispatch -> settle.

Peek-lock batches of ``max_message_count``. Every message of a batch is registered for lock renewal on receipt, for
a budget that covers its wait behind the messages before it (:mod:`gpu_worker.locks`); a message whose lock is
already gone when its turn comes is skipped, neither processed nor settled (``action=skip_lock_lost``): the broker
redelivers it, perhaps to another worker already. Each message is decoded first (a bad envelope is poison:
dead-lettered at once), handled, and settled in exactly one place, :meth:`Consumer._process`'s ``finally``, from
:func:`gpu_worker.settlement.decide`. Only the handler's work is interruptible by a forced shutdown; the settlement
never is.

Batches (``WORKER_MAX_MESSAGE_COUNT`` > 1) trade fewer receive round trips for two costs, both worse the longer a
job runs: the messages waiting in a batch stay locked to this worker (a worker started meanwhile cannot take them),
and a drain (SIGTERM, Spot eviction, scale-in) abandons the ones not started, which costs each of them a delivery:
Service Bus has no "release without counting", so repeated evictions can push a job that never ran to
``MaxDeliveryCountExceeded`` (the dead-letter watcher then fails it with ``max_delivery_count_exceeded``). For GPU
jobs of minutes, use 1; batches pay off only for short jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol
from uuid import UUID

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import MessageAlreadySettled, ServiceBusError
from opentelemetry import trace

from gpu_worker.handler import Outcome
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.locks import Locks
from gpu_worker.settlement import Action, Decision, Interrupted, decide
from gpu_worker.shutdown import Shutdown
from shared.errors import InvalidMessage
from shared.jobs import JobRepository
from shared.messages import JobMessage, decode
from shared.telemetry import context_from_properties

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


class Handler(Protocol):
    def handle(self, message: JobMessage) -> Outcome: ...


def _body(message: ServiceBusReceivedMessage) -> bytes:
    """The data body; a value or sequence body (not what the publisher sends) is an invalid message."""
    try:
        return b"".join(message.body)
    except TypeError as e:
        raise InvalidMessage(f"message body is not a data body: {e}") from e


def _job_id(message: ServiceBusReceivedMessage, envelope: JobMessage | None) -> UUID | None:
    """The job id: from the envelope, else from ``message_id`` (= job id by contract) for undecodable bodies."""
    if envelope is not None:
        return envelope.job_id
    try:
        return UUID(str(message.message_id))
    except ValueError:
        return None


class Consumer:
    def __init__(
        self,
        receiver: ServiceBusReceiver,
        handler: Handler,
        repo: JobRepository,
        shutdown: Shutdown,
        heartbeat: Heartbeat,
        locks: Locks,
        *,
        max_delivery_count: int,
        max_message_count: int,
        max_wait_time: float,
        after_batch: Callable[[], object] | None = None,
    ) -> None:
        self._receiver = receiver
        self._handler = handler
        self._repo = repo
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._max_delivery_count = max_delivery_count
        self._max_message_count = max_message_count
        self._max_wait_time = max_wait_time
        self._after_batch = after_batch
        self._locks = locks
        self.settled: dict[Action, int] = dict.fromkeys(Action, 0)

    def run(self, *, max_jobs: int | None = None, once: bool = False) -> int:
        """Consume until shutdown (or ``max_jobs`` messages, or one batch with ``once``); return messages handled."""
        handled = failures = 0
        while not self._shutdown.requested.is_set():
            self._heartbeat.beat()
            want = self._max_message_count if max_jobs is None else min(self._max_message_count, max_jobs - handled)
            try:
                batch = self._receiver.receive_messages(max_message_count=want, max_wait_time=self._max_wait_time)
            except ServiceBusError as e:  # the SDK has retried already; wait a little, keep the process alive
                failures += 1
                backoff = min(2.0**failures, 30.0)
                logger.warning("receive failed (%r); retrying in %g s", e, backoff, extra={"action": "receive_failed"})
                self._shutdown.requested.wait(backoff)
                continue
            failures = 0
            self._locks.hold(self._receiver, batch)
            for index, message in enumerate(batch):
                if self._shutdown.requested.is_set():
                    self._abandon_unstarted(batch[index:])
                    break
                handled += 1
                if not self._locks.ready(self._receiver, message):
                    self._skip(message)
                    continue
                self._process(message)
            if self._after_batch is not None and not self._shutdown.requested.is_set():
                self._after_batch()
            if once or (max_jobs is not None and handled >= max_jobs):
                break
        self._heartbeat.idle()
        return handled

    def _abandon_unstarted(self, messages: list[ServiceBusReceivedMessage]) -> None:
        for message in messages:
            if self._locks.lost(message):
                self._skip(message)
                continue
            decision = decide(
                Interrupted("not started before shutdown"), message.delivery_count, self._max_delivery_count
            )
            self._settle(message, decision, None)

    def _skip(self, message: ServiceBusReceivedMessage) -> None:
        logger.warning(
            "message %s: lock lost before it started; left to the broker",
            message.message_id,
            extra={
                "job_id": str(job_id) if (job_id := _job_id(message, None)) else None,
                "message_id": message.message_id,
                "delivery_count": message.delivery_count,
                "action": "skip_lock_lost",
            },
        )

    def _process(self, message: ServiceBusReceivedMessage) -> None:
        fields = {"message_id": message.message_id, "delivery_count": message.delivery_count}
        envelope: JobMessage | None = None
        error: BaseException | None = None
        context = context_from_properties(message.application_properties or {})
        with tracer.start_as_current_span("process job", context=context, kind=trace.SpanKind.CONSUMER) as span:
            span.set_attribute("messaging.message.id", str(message.message_id))
            self._heartbeat.busy()
            try:
                envelope = decode(_body(message))
                span.set_attribute("crop_ai.job_id", str(envelope.job_id))
                logger.info("processing job %s", envelope.job_id, extra={**fields, "job_id": str(envelope.job_id)})
                with self._shutdown.interruptible():
                    outcome = self._handler.handle(envelope)
                logger.info(
                    "job %s: %s",
                    envelope.job_id,
                    outcome.value,
                    extra={**fields, "job_id": str(envelope.job_id), "action": outcome.value},
                )
            except BaseException as e:  # every outcome goes to the one decision below; re-raised after if fatal
                error = e
            finally:
                decision = decide(
                    error, message.delivery_count, self._max_delivery_count, lock_lost=self._locks.lost(message)
                )
                span.set_attribute("crop_ai.settlement", decision.action.value)
                if error is not None:
                    span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                self._settle(message, decision, _job_id(message, envelope), error)
                self._heartbeat.idle()
        if error is not None and not isinstance(error, Exception | Interrupted):
            raise error  # KeyboardInterrupt, SystemExit: settled (abandoned) above, now let them through

    def _settle(
        self,
        message: ServiceBusReceivedMessage,
        decision: Decision,
        job_id: UUID | None,
        error: BaseException | None = None,
    ) -> None:
        fields: dict[str, Any] = {
            "job_id": str(job_id) if job_id else None,
            "message_id": message.message_id,
            "delivery_count": message.delivery_count,
            "action": decision.action.value,
            "reason": decision.reason,
        }
        if decision.fail_code is not None and job_id is not None:
            decision = self._fail_job(job_id, decision, message, fields)
            fields.update(action=decision.action.value, reason=decision.reason)
        level = logging.INFO if decision.action is Action.COMPLETE else logging.WARNING
        logger.log(
            logging.ERROR if decision.unexpected else level,
            "message %s: %s%s",
            message.message_id,
            decision.action.value,
            f" ({decision.reason}: {decision.description})" if decision.reason else "",
            exc_info=error if decision.unexpected else None,
            extra=fields,
        )
        try:
            if decision.action is Action.COMPLETE:
                self._receiver.complete_message(message)
            elif decision.action is Action.ABANDON:
                self._receiver.abandon_message(message)
            elif decision.action is Action.DEAD_LETTER:
                self._receiver.dead_letter_message(
                    message, reason=decision.reason, error_description=decision.description
                )
        except (ServiceBusError, MessageAlreadySettled) as e:  # lock lost, connection gone: the broker redelivers
            logger.warning(
                "could not %s message %s: %r",
                decision.action.value,
                message.message_id,
                e,
                extra={**fields, "action": "settle_failed"},
            )
            return
        self.settled[decision.action] += 1

    def _fail_job(
        self, job_id: UUID, decision: Decision, message: ServiceBusReceivedMessage, fields: dict[str, Any]
    ) -> Decision:
        """Mark the job failed before the message leaves the queue. If the database is down, decide again with that
        error (abandon, or on the last delivery dead-letter without it: the dead-letter watcher marks it later)."""
        try:
            self._repo.fail(job_id, decision.fail_code or "", decision.description or "")
        except Exception as e:  # DatabaseUnavailable, or a bug: never let it skip the settlement
            logger.warning("could not mark job %s failed: %r", job_id, e, extra={**fields, "action": "fail_job_failed"})
            retry = decide(
                e, message.delivery_count, self._max_delivery_count, lock_lost=decision.action is Action.LEAVE
            )
            if retry.action is Action.DEAD_LETTER:
                return decision  # last delivery: dead-letter with the original reason; the watcher fails the job
            return retry
        return decision
