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
exactly one place, :meth:`Consumer._process`'s ``finally``: decided by :func:`gpu_worker.settlement.decide`, carried
out by :class:`~gpu_worker.settle.Settler` (the job's side, then the message's); only the attempt is interruptible
by a forced shutdown or its time limit, never the settlement. A cancelled attempt is stopped (``stop``: the job ends
``cancelled``) and its message completed.

After each transition that notifies (the claim; the settlement's succeed, fail or stop; a progress report that
starts a stage) the job's webhook events are handed on (:meth:`shared.events.Notifier.flush`); the worker's row in
``workers`` (:class:`~gpu_worker.registry.Presence`) names the job in hand.

One message per receive: a message waiting in a batch would stay locked to this worker while the one before it
runs for minutes, and a drain would have to abandon it (spending a delivery it never used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError
from opentelemetry import trace

from gpu_worker.attempt import AttemptGuard
from gpu_worker.breaker import Breaker, DatabaseWait
from gpu_worker.handler import JobHandler, Outcome
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.progress import Progress
from gpu_worker.registry import Presence
from gpu_worker.settle import Settler
from gpu_worker.settlement import Action, Interrupted, RetryPolicy, decide
from gpu_worker.shutdown import Shutdown
from shared.errors import InvalidMessage
from shared.events import Notifier
from shared.jobs import Job, JobStore
from shared.messages import JobMessage, decode, parse_message_id
from shared.submission import Publisher
from shared.telemetry import context_from_properties

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


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
        inbox: PriorityInbox,
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
        notifier: Notifier,
        presence: Presence,
        progress_interval: float = 1.0,
    ) -> None:
        self._inbox = inbox
        self._jobs = jobs
        self._handler = handler
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._breaker = breaker
        self._worker_id = worker_id
        self._retry = retry
        self._limits = limits
        self._notifier = notifier
        self._presence = presence
        self._progress_interval = progress_interval
        self._when_the_database_answers = DatabaseWait(breaker, shutdown.requested, heartbeat.beat)
        self._settler = Settler(jobs, publisher, locks, notifier, self._when_the_database_answers)

    @property
    def settled(self) -> dict[Action, int]:
        """Messages settled so far, by what the broker was told."""
        return self._settler.settled

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
                self._settler.settle(message, receiver, decision, job, job_id, error)
                self._heartbeat.idle()
                self._presence.working_on(None)
        if error is not None and not isinstance(error, Exception | Interrupted):
            raise error  # KeyboardInterrupt, SystemExit: settled above, now let them through

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
            self._presence.working_on(job.job_id)
            self._notifier.flush(job.job_id)  # never raises: what it cannot hand on, the reconciler sweeps
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
