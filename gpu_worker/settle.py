"""Carrying out a settlement :func:`gpu_worker.settlement.decide` made: the job's side first, then the message's.

The job's side, fenced by the attempt, waits for the database if it is down (:class:`~gpu_worker.breaker.DatabaseWait`,
the message still locked): ``fail_code`` fails the attempt; ``stop`` ends a cancelled attempt (the job is
``cancelled``); ``retry`` releases the attempt and schedules the next generation after the backoff (the outbox
order: release, send, confirm), then completes this message. When the job's side cannot be done (a shutdown ended
the wait, the send failed, a bug), the message is abandoned instead: its redelivery, or the reconciler once the
lease runs out, comes back to the job. The job's webhook events are then handed on
(:meth:`shared.events.Notifier.flush`).

The message's side: complete, abandon or dead-letter it with the receiver it came from; a message whose lock was
lost is left to the broker (its redelivery finds the job moved on), and a settlement the broker refuses is logged.

Settlements are made by the pipeline's finishing and settling threads (:mod:`gpu_worker.pipeline`), so
:attr:`Settler.settled` is counted under a lock; the receiver serialises them with its receives and lock renewals
(:class:`~gpu_worker.receiver.SerialReceiver`, which reopens a receiver that a failed receive closed). A settlement
the SDK refuses with a ``ValueError`` (a receiver closed and not reopened) is a failed settlement like any other.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus.exceptions import MessageAlreadySettled, ServiceBusError

from gpu_worker.breaker import DatabaseWait
from gpu_worker.locks import LostLocks
from gpu_worker.settlement import CANCELLED, Action, Decision
from shared.errors import DatabaseUnavailable
from shared.events import Notifier
from shared.jobs import Job, JobStore
from shared.messages import JobMessage
from shared.submission import Publisher

logger = logging.getLogger(__name__)


class Receiver(Protocol):
    """The settling side of a receiver (:class:`~gpu_worker.receiver.SerialReceiver`)."""

    def complete_message(self, message: ServiceBusReceivedMessage) -> None: ...
    def abandon_message(self, message: ServiceBusReceivedMessage) -> None: ...
    def dead_letter_message(
        self, message: ServiceBusReceivedMessage, reason: str | None = None, error_description: str | None = None
    ) -> None: ...


class Settler:
    def __init__(
        self, jobs: JobStore, publisher: Publisher, locks: LostLocks, notifier: Notifier, wait: DatabaseWait
    ) -> None:
        self._jobs = jobs
        self._publisher = publisher
        self._locks = locks
        self._notifier = notifier
        self._when_the_database_answers = wait
        self.settled: dict[Action, int] = dict.fromkeys(Action, 0)  # messages, by what the broker was told
        self._lock = threading.Lock()  # the pipeline settles from two threads

    def settle(
        self,
        message: ServiceBusReceivedMessage,
        receiver: Receiver,
        decision: Decision,
        job: Job | None,
        job_id: UUID | None,
        error: BaseException | None,
    ) -> None:
        """Carry out ``decision`` for ``message`` (received by ``receiver``) and ``job``, the attempt it claimed
        (``None``: nothing claimed); ``error``, what the attempt raised, is logged with its stack if unexpected."""
        fields: dict[str, Any] = {
            "job_id": str(job_id) if job_id else None,
            "message_id": message.message_id,
            "delivery_count": message.delivery_count,
            "attempt": job.attempts if job else None,
        }
        if decision.fail_code is not None and job is not None:
            decision = self._fail(job, decision, fields)
        if decision.stop and job is not None:
            decision = self._stop(job, decision, fields)
        if decision.action is Action.RETRY:
            assert job is not None, "only a claimed attempt is retried"
            decision = self._reschedule(job, decision, fields)
        if job is not None:
            self._notifier.flush(job)  # the succeed, fail or stop of this attempt; never raises
        self._broker_settle(message, receiver, decision, fields, error)

    def _broker_settle(
        self,
        message: ServiceBusReceivedMessage,
        receiver: Receiver,
        decision: Decision,
        fields: dict[str, Any],
        error: BaseException | None,
    ) -> None:
        fields.update(action=decision.action.value, reason=decision.reason)
        level = logging.INFO if decision.action is Action.COMPLETE else logging.WARNING
        logger.log(
            logging.ERROR if decision.unexpected else level,
            "message %s: %s%s",
            message.message_id,
            decision.action.value,
            f" ({decision.reason}: {decision.description})" if decision.description else "",
            exc_info=error if decision.unexpected else None,
            extra=fields,
        )
        if self._locks.lost(message):  # settling needs the lock; the redelivery finds the job moved on
            logger.warning("message %s: lock lost; left to the broker", message.message_id,
                           extra={**fields, "action": "leave_lock_lost"})  # fmt: skip
            self._locks.forget(message)
            return
        try:
            if decision.action is Action.COMPLETE:
                receiver.complete_message(message)
            elif decision.action is Action.ABANDON:
                receiver.abandon_message(message)
            elif decision.action is Action.DEAD_LETTER:
                receiver.dead_letter_message(message, reason=decision.reason, error_description=decision.description)
        except (ServiceBusError, MessageAlreadySettled, ValueError) as e:  # lock lost, connection gone: redelivered
            logger.warning("could not %s message %s: %r", decision.action.value, message.message_id, e,
                           extra={**fields, "action": "settle_failed"})  # fmt: skip
            return
        with self._lock:
            self.settled[decision.action] += 1

    def _fail(self, job: Job, decision: Decision, fields: dict[str, Any]) -> Decision:
        """Fail the attempt before its message leaves the queue (waiting for the database if it is down); if that
        still fails (a shutdown ended the wait, a bug), abandon: the redelivery, or the reconciler once the lease
        runs out, comes back to it."""
        try:
            self._when_the_database_answers(
                lambda: self._jobs.fail(job.job_id, job.attempts, decision.fail_code or "", decision.description or "")
            )
        except Exception as e:  # DatabaseUnavailable, or a bug: the message must still be settled
            logger.warning("could not fail job %s: %s", job.job_id, e, extra={**fields, "action": "fail_job_failed"})
            return Decision(Action.ABANDON, type(e).__name__, str(e)[:1000])
        return decision

    def _stop(self, job: Job, decision: Decision, fields: dict[str, Any]) -> Decision:
        """End the cancelled attempt (``stop``: the job is ``cancelled``) before its message is completed, waiting for
        the database if it is down; if that still fails, abandon: the redelivery finds the job being cancelled and
        its attempt's lease running out, which the reconciler's ``cancel_expired`` ends."""
        try:
            stopped = self._when_the_database_answers(lambda: self._jobs.stop(job.job_id, job.attempts))
        except Exception as e:  # DatabaseUnavailable, or a bug: the message must still be settled
            logger.warning("could not stop job %s: %s", job.job_id, e, extra={**fields, "action": "stop_failed"})
            return Decision(Action.ABANDON, type(e).__name__, str(e)[:1000])
        if stopped is not None:
            logger.info("job %s: attempt %d stopped, cancelled", job.job_id, job.attempts,
                        extra={**fields, "action": "cancelled"})  # fmt: skip
        return Decision(Action.COMPLETE, CANCELLED, decision.description)

    def _cancel_requested(self, job: Job) -> bool:
        """Whether a write of the attempt was refused because a cancellation of the job was requested."""
        try:
            current = self._jobs.get(job.job_id)
        except DatabaseUnavailable:
            return False  # the lease runs out; the reconciler ends the job
        return current is not None and current.attempts == job.attempts and current.cancel_requested_at is not None

    def _reschedule(self, job: Job, decision: Decision, fields: dict[str, Any]) -> Decision:
        """Release the attempt, schedule the next generation after the backoff, then complete this message. The
        outbox order: the release waits for the database if it is down, and if it still fails, abandon (the lease
        runs out, the reconciler re-queues); if the send fails, abandon (the redelivery claims the released job);
        an unconfirmed send is the reconciler's."""
        try:
            released = self._when_the_database_answers(
                lambda: self._jobs.release(job.job_id, job.attempts, drain=decision.drain)
            )
        except Exception as e:  # DatabaseUnavailable, or a bug: the message must still be settled
            logger.warning("could not release job %s: %s", job.job_id, e, extra={**fields, "action": "release_failed"})
            return Decision(Action.ABANDON, decision.reason, decision.description, unexpected=decision.unexpected)
        if released is None:  # cancelled or taken over meanwhile: nothing of ours to retry
            if self._cancel_requested(job):
                return self._stop(job, decision, fields)
            return Decision(Action.COMPLETE, decision.reason, decision.description)
        delay = decision.delay or timedelta(0)
        due = datetime.now(UTC) + delay if delay > timedelta(0) else None
        try:
            self._publisher.send(JobMessage.for_job(released), at=due)
        except Exception as e:  # BusUnavailable, or a bug: the redelivery of this message claims the released job
            logger.warning("could not schedule job %s: %s", job.job_id, e, extra={**fields, "action": "retry_failed"})
            return Decision(Action.ABANDON, decision.reason, decision.description, unexpected=decision.unexpected)
        try:
            self._jobs.confirm_sent(released.job_id, released.generation)
        except Exception:  # the reconciler may send it once more: harmless
            logger.warning("job %s: retry scheduled but not confirmed", job.job_id, extra=fields)
        logger.warning(
            "job %s: attempt %d released; generation %d due in %g s",
            job.job_id,
            job.attempts,
            released.generation,
            delay.total_seconds(),
            extra={**fields, "action": "retry_scheduled", "generation": released.generation},
        )
        return Decision(Action.COMPLETE, decision.reason, decision.description, unexpected=decision.unexpected)
