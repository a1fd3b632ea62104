"""Receive -> claim -> run -> settle, one message at a time, from the high-priority queue first.

Before each receive (the first one included) the circuit breaker (:mod:`gpu_worker.breaker`) makes sure PostgreSQL
and Blob Storage answer; while one is down the worker does not receive. A message already in hand when the database
goes away (at its claim, or at its release) waits for it, locked, instead of being abandoned: outages cost time, not
deliveries; and an attempt cut short by an outage the probes confirm is not charged against ``JOB_MAX_ATTEMPTS``.

Messages come from :class:`~gpu_worker.inbox.PriorityInbox` (``jobs-high`` first, ``jobs`` at least every
``WORKER_HIGH_PRIORITY_BURST + 1`` jobs), each with the receiver that settles it. A received message is decoded (a
bad envelope is poison: dead-lettered at once), then its job is *claimed* (:meth:`shared.jobs.JobStore.claim`): a
job that is finished, cancelled, or running under another worker's live lease, is not run again, and the message is
completed. A claimed attempt runs inside an :class:`~gpu_worker.attempt.AttemptGuard` (lease renewal, time limit,
cancellation) and reports its progress (:class:`~gpu_worker.progress.Progress`). Whatever happened is settled in
exactly one place, :meth:`Consumer._process`'s ``finally``, from :func:`gpu_worker.settlement.decide`; only the
attempt is interruptible by a forced shutdown or its time limit, never the settlement. A cancelled attempt is
stopped (``stop``: the job ends ``cancelled``) and its message completed.

After each transition that notifies (the claim; the settlement's succeed, fail or stop; a progress report that
starts a stage) the job's webhook events are handed on (:meth:`shared.events.Notifier.flush`); the worker's row in
``workers`` (:class:`~gpu_worker.registry.Presence`) names the job in hand.

One message per receive: a message waiting in a batch would stay locked to this worker while the one before it
runs for minutes, and a drain would have to abandon it (spending a delivery it never used).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import MessageAlreadySettled, ServiceBusError
from opentelemetry import trace

from gpu_worker.attempt import AttemptGuard
from gpu_worker.breaker import Breaker
from gpu_worker.handler import JobHandler, Outcome
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.progress import Progress
from gpu_worker.registry import Presence
from gpu_worker.settlement import CANCELLED, Action, Decision, Interrupted, RetryPolicy, decide
from gpu_worker.shutdown import Shutdown
from shared.errors import DatabaseUnavailable, InvalidMessage
from shared.events import Notifier
from shared.jobs import Job, JobStore
from shared.messages import JobMessage, decode, parse_message_id
from shared.submission import Publisher
from shared.telemetry import context_from_properties

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AttemptLimits:
    lease: timedelta
    timeout: timedelta
    hard_exit_after: float  # seconds past the time limit before the process exits


def _body(message: ServiceBusReceivedMessage) -> bytes:
    """The data body; a value or sequence body (not what the publisher sends) is an invalid message."""
    try:
        return b"".join(message.body)
    except TypeError as e:
        raise InvalidMessage(f"message body is not a data body: {e}") from e


class Consumer:
    """``receiver``: both queues' :class:`PriorityInbox`, or one queue's receiver. ``notifier`` ``None``: webhook
    events are left to the reconciler's sweep; ``presence`` ``None``: no row in ``workers``."""

    def __init__(
        self,
        receiver: ServiceBusReceiver | PriorityInbox,
        jobs: JobStore,
        handler: JobHandler,
        publisher: Publisher,
        shutdown: Shutdown,
        heartbeat: Heartbeat,
        locks: LostLocks,
        breaker: Breaker,
        *,
        worker_id: str,
        retry: RetryPolicy,
        limits: AttemptLimits,
        max_wait_time: float,
        notifier: Notifier | None = None,
        presence: Presence | None = None,
        progress_interval: float = 1.0,
    ) -> None:
        self._inbox = receiver if isinstance(receiver, PriorityInbox) else PriorityInbox(receiver, wait=max_wait_time)
        self._jobs = jobs
        self._handler = handler
        self._publisher = publisher
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._locks = locks
        self._breaker = breaker
        self._worker_id = worker_id
        self._retry = retry
        self._limits = limits
        self._notifier = notifier
        self._presence = presence
        self._progress_interval = progress_interval
        self.settled: dict[Action, int] = dict.fromkeys(Action, 0)

    def run(self, *, max_jobs: int | None = None) -> int:
        """Consume until shutdown (or ``max_jobs`` messages); return the number of messages handled."""
        handled = failures = 0
        while not self._shutdown.requested.is_set():
            self._heartbeat.beat()
            if not self._breaker.wait_until_closed(self._shutdown.requested, tick=self._heartbeat.beat):
                break
            try:
                received = self._inbox.receive()
            except ServiceBusError as e:  # the SDK has retried already; wait a little, keep the process alive
                failures += 1
                backoff = min(2.0**failures, 30.0)
                logger.warning("receive failed (%r); retrying in %g s", e, backoff, extra={"action": "receive_failed"})
                self._shutdown.requested.wait(backoff)
                continue
            failures = 0
            if received is not None:
                handled += 1
                self._process(received.message, received.receiver)
            if max_jobs is not None and handled >= max_jobs:
                break
        self._heartbeat.idle()
        return handled

    def _process(self, message: ServiceBusReceivedMessage, receiver: ServiceBusReceiver) -> None:
        fields: dict[str, Any] = {"message_id": message.message_id, "delivery_count": message.delivery_count}
        job: Job | None = None
        guard: AttemptGuard | None = None
        job_id = (parse_message_id(str(message.message_id)) or (None, 0))[0]
        error: BaseException | None = None
        context = context_from_properties(message.application_properties or {})
        with tracer.start_as_current_span("process job", context=context, kind=trace.SpanKind.CONSUMER) as span:
            span.set_attribute("messaging.message.id", str(message.message_id))
            self._heartbeat.busy()
            try:
                envelope = decode(_body(message))
                job_id = envelope.job_id
                fields["job_id"] = str(job_id)
                span.set_attribute("crop_ai.job_id", str(job_id))
                job = self._claim(envelope, fields)
                if job is not None:
                    fields["attempt"] = job.attempts
                    guard = self._guard(job)
                    outcome = self._attempt(job, guard)
                    logger.info("job %s: %s", job_id, outcome.value, extra={**fields, "action": outcome.value})
            except BaseException as e:  # every outcome goes to the one decision below; re-raised after if fatal
                error = e
            finally:
                self._breaker.record(error)
                outage = job is not None and self._breaker.confirms_outage(error)
                cancelling = guard is not None and guard.cancel_requested.is_set()
                charged = job.charged if job is not None else None
                decision = decide(error, charged, self._retry, outage=outage, cancelling=cancelling)
                span.set_attribute("crop_ai.settlement", decision.action.value)
                if error is not None:
                    span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                self._settle(message, receiver, decision, job, job_id, error)
                self._heartbeat.idle()
                if self._presence is not None:
                    self._presence.working_on(None)
        if error is not None and not isinstance(error, Exception | Interrupted):
            raise error  # KeyboardInterrupt, SystemExit: settled above, now let them through

    def _when_the_database_answers(self, call: Callable[[], T]) -> T:
        """``call()``; if the database is down, wait for it (the breaker's probes, the message still locked and its
        lock renewed) and call once more, instead of abandoning the message and spending one of its deliveries."""
        try:
            return call()
        except DatabaseUnavailable as e:
            self._breaker.record(e)
            if not self._breaker.wait_until_closed(self._shutdown.requested, tick=self._heartbeat.beat):
                raise
            return call()

    def _claim(self, envelope: JobMessage, fields: dict[str, Any]) -> Job | None:
        job = self._when_the_database_answers(
            lambda: self._jobs.claim(
                envelope.job_id,
                worker_id=self._worker_id,
                lease=self._limits.lease,
                max_attempts=self._retry.max_attempts,
            )
        )
        if job is not None:
            logger.info("job %s: attempt %d claimed", job.job_id, job.attempts, extra={**fields, "action": "claim"})
            if self._presence is not None:
                self._presence.working_on(job.job_id)
            self._notify(job.job_id)
            return job
        current = self._jobs.get(envelope.job_id)
        if current is None:
            raise InvalidMessage(f"job {envelope.job_id} does not exist")
        logger.info(
            "job %s is %s (attempt %d): nothing to do for message %s",
            current.job_id,
            current.status.value,
            current.attempts,
            envelope.message_id,
            extra={**fields, "action": Outcome.NOT_CLAIMED.value},
        )
        return None

    def _guard(self, job: Job) -> AttemptGuard:
        return AttemptGuard(
            self._jobs,
            job,
            lease=self._limits.lease,
            timeout=self._limits.timeout,
            interrupt=self._shutdown.interrupt,
            hard_exit_after=self._limits.hard_exit_after,
        )

    def _attempt(self, job: Job, guard: AttemptGuard) -> Outcome:
        progress = Progress(self._jobs, guard, self._notifier, interval=self._progress_interval)
        with guard, self._shutdown.interruptible():
            return self._handler.run(job, guard, progress)

    def _notify(self, job_id: UUID) -> None:
        if self._notifier is not None:
            self._notifier.flush(job_id)  # never raises: what it cannot hand on, the reconciler sweeps

    def _settle(
        self,
        message: ServiceBusReceivedMessage,
        receiver: ServiceBusReceiver,
        decision: Decision,
        job: Job | None,
        job_id: UUID | None,
        error: BaseException | None,
    ) -> None:
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
            self._notify(job.job_id)  # the succeed, fail or stop of this attempt
        self._broker_settle(message, receiver, decision, fields, error)

    def _broker_settle(
        self,
        message: ServiceBusReceivedMessage,
        receiver: ServiceBusReceiver,
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
        except (ServiceBusError, MessageAlreadySettled) as e:  # lock lost, connection gone: the broker redelivers
            logger.warning("could not %s message %s: %r", decision.action.value, message.message_id, e,
                           extra={**fields, "action": "settle_failed"})  # fmt: skip
            return
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
