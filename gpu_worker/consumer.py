"""Receive -> claim -> run -> settle, one message at a time.

Before each receive (the first one included) the circuit breaker (:mod:`gpu_worker.breaker`) makes sure PostgreSQL
and Blob Storage answer; while one is down the worker does not receive. A message already in hand when the database
goes away (at its claim, or at its release) waits for it, locked, instead of being abandoned: outages cost time, not
deliveries; and an attempt cut short by an outage the probes confirm is not charged against ``JOB_MAX_ATTEMPTS``.

A received message is decoded (a bad envelope is poison:
dead-lettered at once), then its job is *claimed* (:meth:`shared.jobs.JobStore.claim`): a job that is finished, or
running under another worker's live lease, is not run again, and the message is completed. A claimed attempt runs
inside an :class:`~gpu_worker.attempt.AttemptGuard` (lease renewal, time limit). Whatever happened is settled in
exactly one place, :meth:`Consumer._process`'s ``finally``, from :func:`gpu_worker.settlement.decide`; only the
attempt is interruptible by a forced shutdown or its time limit, never the settlement.

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
from gpu_worker.locks import LostLocks
from gpu_worker.settlement import Action, Decision, Interrupted, RetryPolicy, decide
from gpu_worker.shutdown import Shutdown
from shared.errors import DatabaseUnavailable, InvalidMessage
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
    def __init__(
        self,
        receiver: ServiceBusReceiver,
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
    ) -> None:
        self._receiver = receiver
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
        self._max_wait_time = max_wait_time
        self.settled: dict[Action, int] = dict.fromkeys(Action, 0)

    def run(self, *, max_jobs: int | None = None) -> int:
        """Consume until shutdown (or ``max_jobs`` messages); return the number of messages handled."""
        handled = failures = 0
        while not self._shutdown.requested.is_set():
            self._heartbeat.beat()
            if not self._breaker.wait_until_closed(self._shutdown.requested, tick=self._heartbeat.beat):
                break
            try:
                batch = self._receiver.receive_messages(max_message_count=1, max_wait_time=self._max_wait_time)
            except ServiceBusError as e:  # the SDK has retried already; wait a little, keep the process alive
                failures += 1
                backoff = min(2.0**failures, 30.0)
                logger.warning("receive failed (%r); retrying in %g s", e, backoff, extra={"action": "receive_failed"})
                self._shutdown.requested.wait(backoff)
                continue
            failures = 0
            for message in batch:
                handled += 1
                self._process(message)
            if max_jobs is not None and handled >= max_jobs:
                break
        self._heartbeat.idle()
        return handled

    def _process(self, message: ServiceBusReceivedMessage) -> None:
        fields: dict[str, Any] = {"message_id": message.message_id, "delivery_count": message.delivery_count}
        job: Job | None = None
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
                    outcome = self._attempt(job)
                    logger.info("job %s: %s", job_id, outcome.value, extra={**fields, "action": outcome.value})
            except BaseException as e:  # every outcome goes to the one decision below; re-raised after if fatal
                error = e
            finally:
                self._breaker.record(error)
                outage = job is not None and self._breaker.confirms_outage(error)
                decision = decide(error, job.charged if job is not None else None, self._retry, outage=outage)
                span.set_attribute("crop_ai.settlement", decision.action.value)
                if error is not None:
                    span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                self._settle(message, decision, job, job_id, error)
                self._heartbeat.idle()
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

    def _attempt(self, job: Job) -> Outcome:
        guard = AttemptGuard(
            self._jobs,
            job,
            lease=self._limits.lease,
            timeout=self._limits.timeout,
            interrupt=self._shutdown.interrupt,
            hard_exit_after=self._limits.hard_exit_after,
        )
        with guard, self._shutdown.interruptible():
            return self._handler.run(job, guard)

    def _settle(
        self,
        message: ServiceBusReceivedMessage,
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
        if decision.action is Action.RETRY:
            assert job is not None, "only a claimed attempt is retried"
            decision = self._reschedule(job, decision, fields)
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
                self._receiver.complete_message(message)
            elif decision.action is Action.ABANDON:
                self._receiver.abandon_message(message)
            elif decision.action is Action.DEAD_LETTER:
                self._receiver.dead_letter_message(
                    message, reason=decision.reason, error_description=decision.description
                )
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
