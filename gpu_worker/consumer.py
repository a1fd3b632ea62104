"""Receive -> claim -> download -> analyse -> upload -> settle, from the high-priority queue first, pipelined.

Each received message becomes one :class:`Flight`, which goes through the stages of :mod:`gpu_worker.pipeline`:

* **prepare** (the preparing thread): decode the envelope (a bad one is poison: dead-lettered at once), *claim* the
  job (:meth:`shared.jobs.JobStore.claim`): a job that is finished, cancelled, or running under another worker's
  live lease, is not run again, and the message is completed. A claimed attempt gets its
  :class:`~gpu_worker.attempt.AttemptGuard` at once (lease renewal, time limit, cancellation) and its
  :class:`~gpu_worker.progress.Progress`, and its input is downloaded and checked
  (:meth:`~gpu_worker.handler.JobHandler.prepare`).
* **compute** (a computing thread: the main thread, and with ``analyses`` above 1 as many others): the analysis. In
  the main thread it runs inside :meth:`gpu_worker.shutdown.Shutdown.interruptible`, so a forced shutdown or its
  time limit interrupts it at once (the time limit interrupts the main thread only while its own attempt is the one
  analysing there); in another computing thread, and for an attempt not being analysed, its next checkpoint stops it
  (every progress report checks the attempt, :meth:`~gpu_worker.attempt.AttemptGuard.check`).
* **finish** (the finishing thread): upload the outputs and store the result (``succeed``, fenced by the attempt),
  then settle.

Whatever happened, at whichever stage (bad envelope, not claimed, download error, analysis error, cancellation,
attempt lost, success), the flight is settled in exactly one place, :meth:`Consumer._settle`: decided by
:func:`gpu_worker.settlement.decide`, carried out by :class:`~gpu_worker.settle.Settler` (the job's side, then the
message's), never cut short. A cancelled attempt is stopped (``stop``: the job ends ``cancelled``) and its message
completed. An error that must stop the worker (``SystemExit``, ``KeyboardInterrupt``) is settled, then the worker
stops receiving, finishes what is in flight and re-raises it.

Before each receive (the first one included) the circuit breaker (:mod:`gpu_worker.breaker`) makes sure PostgreSQL
and Blob Storage answer; while one is down the worker does not receive. A message already in hand when the database
goes away (at its claim, or at its settlement) waits for it, locked, instead of being abandoned: outages cost time,
not deliveries; and an attempt cut short by an outage the probes confirm is not charged against ``JOB_MAX_ATTEMPTS``.

Messages come from :class:`~gpu_worker.inbox.PriorityInbox` (``jobs-high`` first, ``jobs`` at least every
``WORKER_HIGH_PRIORITY_BURST + 1`` jobs), each with the receiver that settles it, one per receive: a message received in
a batch would wait, locked, for a slot of the pipeline. At most ``in_flight`` (``WORKER_JOBS_IN_FLIGHT``) messages are
in hand: with 1 the worker runs one message at a time, as a sequential loop does; above 1, the next job is received,
claimed and downloaded, and the last one uploaded and settled, while one is analysed (``analyses`` at once,
``WORKER_ANALYSES``). A message prepared ahead is locked to this worker while another job is analysed, so an idle worker
elsewhere cannot take it (see :mod:`gpu_worker.pipeline`). A drain (SIGTERM) stops receiving: every message in hand is
analysed and settled within the grace. Past it, the job being analysed is interrupted, a download or upload under way
stops at its next check (:mod:`gpu_worker.handler`), and every flight not already settling is released the same way
(``Interrupted``: released uncharged, the next generation sent at once, by the pipeline's settling thread, not behind an
upload); the consumer returns once all are settled, and only then is the shutdown ``drained``.

After each transition that notifies (the claim; the settlement's succeed, fail or stop; a progress report that
starts a stage) the job's webhook events are handed on (:meth:`shared.events.Notifier.flush`, thread-safe: the event
store is on the pool, the sender has a lock); the worker's row in ``workers`` (:class:`~gpu_worker.registry.
Presence`) names a job being analysed, or else the latest one in hand; the heartbeat file
(:class:`~gpu_worker.heartbeat.Heartbeat`) records each thread's work.

Metrics (:mod:`shared.metrics`): a claimed attempt counts as in flight until its settlement, which counts it as
completed (by outcome and code) with its run time (claim to settlement); a job's first claim records its queue wait;
each stage (``download``, ``analysis``, ``upload``, ``settle``) records its duration. The flight's span carries the
same values as attributes (``requests`` in Application Insights: the per-job record the p95 panels and alert use).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus.exceptions import ServiceBusError
from opentelemetry import trace

from gpu_worker.analysis import AnalysisOutput
from gpu_worker.attempt import AttemptGuard
from gpu_worker.breaker import Breaker, DatabaseWait
from gpu_worker.handler import JobHandler, Outcome, Prepared
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.malloc import release_free_memory
from gpu_worker.pipeline import Pipeline
from gpu_worker.progress import Progress
from gpu_worker.receiver import SerialReceiver
from gpu_worker.registry import Presence
from gpu_worker.settle import Settler
from gpu_worker.settlement import Action, Interrupted, RetryPolicy, decide, outcome
from gpu_worker.shutdown import Shutdown
from shared import metrics
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


@dataclass(eq=False)
class Flight:
    """One received message on its way through the pipeline, and what became of it."""

    message: ServiceBusReceivedMessage
    receiver: SerialReceiver
    span: trace.Span
    fields: dict[str, Any] = field(default_factory=dict)  # the log records' extra
    job_id: UUID | None = None
    job: Job | None = None  # the claimed attempt
    guard: AttemptGuard | None = None
    progress: Progress | None = None
    prepared: Prepared | None = None
    output: AnalysisOutput | None = None
    error: BaseException | None = None
    labels: metrics.JobLabels | None = None  # the claimed attempt's metric dimensions
    claimed_at: float | None = None  # time.monotonic() of the claim


@contextlib.contextmanager
def _stage(flight: Flight, stage: str) -> Iterator[None]:
    """Record how long ``stage`` of the flight's claimed attempt took, whatever ended it."""
    started = time.monotonic()
    try:
        yield
    finally:
        if flight.labels is not None:
            metrics.stage_finished(flight.labels, stage, time.monotonic() - started)


def _active(span: trace.Span) -> contextlib.AbstractContextManager[trace.Span]:
    """``span`` current in this thread (a flight's stages run in three); its status is the settlement's to set."""
    return trace.use_span(span, record_exception=False, set_status_on_exception=False)


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
        device: str = "cpu",
        retry: RetryPolicy,
        limits: AttemptLimits,
        notifier: Notifier,
        presence: Presence,
        in_flight: int = 1,
        analyses: int = 1,
        progress_interval: float = 1.0,
    ) -> None:
        self._inbox = inbox
        self._jobs = jobs
        self._handler = handler
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._breaker = breaker
        self._worker_id = worker_id
        self._device = device
        self._retry = retry
        self._limits = limits
        self._notifier = notifier
        self._presence = presence
        self._in_flight = in_flight
        self._analyses = analyses
        self._progress_interval = progress_interval
        self._when_the_database_answers = DatabaseWait(breaker, shutdown.requested, heartbeat.beat)
        self._settler = Settler(jobs, publisher, locks, notifier, self._when_the_database_answers)
        self._receive_failures = 0
        self._analysing: Flight | None = None  # the flight in the main thread's analysis (guarded by the lock)
        self._analysing_lock = threading.Lock()
        self._fatal: BaseException | None = None  # settled; to re-raise once everything in hand is settled
        self._pipeline: Pipeline[Flight] | None = None  # while run runs

    @property
    def settled(self) -> dict[Action, int]:
        """Messages settled so far, by what the broker was told."""
        return self._settler.settled

    def run(self, *, max_jobs: int | None = None) -> int:
        """Consume until shutdown (or ``max_jobs`` messages); return the number of messages received, every one of
        them settled by then. Call it from the main thread: an analysis runs there."""
        self._fatal = None
        self._pipeline = Pipeline(self, in_flight=self._in_flight, stopping=self._stopping, analyses=self._analyses)
        try:
            handled = self._pipeline.run(max_jobs)
        finally:
            self._pipeline = None
        self._heartbeat.beat()
        if self._fatal is not None:
            raise self._fatal  # KeyboardInterrupt, SystemExit: settled, now let them through
        return handled

    def _stopping(self) -> bool:
        return self._shutdown.requested.is_set() or self._fatal is not None

    # The stages (gpu_worker.pipeline.Stages)

    def receive(self) -> Flight | None:
        """The next message as a flight, or ``None``; waits for the backends first (the breaker)."""
        if self._stopping() or not self._breaker.wait_until_closed(self._shutdown.requested, tick=self._heartbeat.beat):
            return None
        try:
            received = self._inbox.receive()
        except ServiceBusError as e:  # the SDK has retried already; wait a little, keep the process alive
            self._receive_failures += 1
            backoff = min(2.0**self._receive_failures, 30.0)
            logger.warning("receive failed (%r); retrying in %g s", e, backoff, extra={"action": "receive_failed"})
            self._shutdown.requested.wait(backoff)
            return None
        self._receive_failures = 0
        self._heartbeat.beat()
        if received is None:
            return None
        message = received.message
        context = context_from_properties(message.application_properties or {})
        span = tracer.start_span(metrics.JOB_SPAN, context=context, kind=trace.SpanKind.CONSUMER)
        span.set_attribute("messaging.message.id", str(message.message_id))
        flight = Flight(message, received.receiver, span)
        flight.fields = {"message_id": message.message_id, "delivery_count": message.delivery_count}
        flight.job_id = (parse_message_id(str(message.message_id)) or (None, 0))[0]
        return flight

    def prepare(self, flight: Flight) -> bool:
        """Decode, claim, start the attempt's guard, download: ``True`` when there is an attempt to analyse."""
        self._heartbeat.busy()
        try:
            with _active(flight.span):
                envelope = decode(_body(flight.message))
                flight.job_id = envelope.job_id
                flight.fields["job_id"] = str(envelope.job_id)
                flight.span.set_attribute(metrics.SPAN_JOB_ID, str(envelope.job_id))
                job = flight.job = self._claim(envelope, flight.fields)
                if job is None:
                    return False
                flight.fields["attempt"] = job.attempts
                self._claimed(flight, job)
                guard = flight.guard = self._guard(flight, job)
                guard.__enter__()  # lease renewal and the time limit, from the claim to the settlement
                flight.progress = Progress(self._jobs, guard, self._notifier, interval=self._progress_interval)
                with _stage(flight, "download"):
                    flight.prepared = self._handler.prepare(job, guard, flight.progress)
                return True
        except BaseException as e:  # every outcome goes to the one settlement
            flight.error = e
            return False
        finally:
            if flight.guard is not None:
                flight.guard.pause()  # waiting for the main thread (or the settlement) is not the attempt's time
            self._heartbeat.idle()

    def compute(self, flight: Flight) -> None:
        """The analysis, in a computing thread: in the main thread interruptible at once (a forced shutdown, the
        attempt's time limit), in another at its next checkpoint."""
        job, guard, progress, prepared = flight.job, flight.guard, flight.progress, flight.prepared
        assert job is not None, "only a claimed attempt is prepared for the analysis"
        assert guard is not None
        assert progress is not None
        assert prepared is not None
        self._heartbeat.busy()
        self._presence.computing(job.job_id)
        guard.resume()
        try:
            with _active(flight.span), self._interruptible(flight):
                guard.check()  # cancelled, taken over or timed out while it waited
                with _stage(flight, "analysis"):
                    flight.output = self._handler.analyse(job, prepared, progress)
        except BaseException as e:  # Interrupted (a forced shutdown, at once if it came before), TimedOut, ...
            flight.error = e
        finally:
            if threading.current_thread() is threading.main_thread():
                self._analysing = None  # even if an interruption landed inside _analysing_now's own exit
            guard.pause()
            self._presence.computed(job.job_id)
            self._heartbeat.idle()
            release_free_memory()  # what the analysis freed, before the next one's peak comes on top of it

    def finish(self, flight: Flight) -> None:
        """Upload and store the result of an analysed attempt, then settle the message, whatever became of it."""
        self._heartbeat.busy()
        try:
            with _active(flight.span):
                job, guard, progress, output = flight.job, flight.guard, flight.progress, flight.output
                if flight.error is None and job is not None:
                    try:
                        if guard is None or progress is None or output is None:
                            raise RuntimeError(f"attempt {job.attempts} of job {job.job_id} was never analysed")
                        guard.resume()
                        with _stage(flight, "upload"):
                            finished = self._handler.finish(job, output, guard, progress)
                        logger.info("job %s: %s", job.job_id, finished.value,
                                    extra={**flight.fields, "action": finished.value})  # fmt: skip
                    except BaseException as e:
                        flight.error = e
                self._settle(flight)
        finally:
            self._inbox.release(flight.message)
            flight.span.end()
            if flight.prepared is not None:
                flight.prepared.close()
            self._heartbeat.idle()
            release_free_memory()  # the upload's buffers

    # One message, settled once

    def _settle(self, flight: Flight) -> None:
        """The one settlement of ``flight``: the attempt's guard stops, :func:`decide` decides, the settler carries
        it out."""
        job, guard, error = flight.job, flight.guard, flight.error
        if guard is not None:
            guard.__exit__(None, None, None)
        self._breaker.record(error)
        outage = job is not None and self._breaker.confirms_outage(error)
        cancelling = guard is not None and guard.cancel_requested.is_set()
        charged = job.charged if job is not None else None
        decision = decide(error, charged, self._retry, outage=outage, cancelling=cancelling)
        flight.span.set_attribute("crop_ai.settlement", decision.action.value)
        if error is not None:
            flight.span.set_status(trace.StatusCode.ERROR, type(error).__name__)
        try:
            with _stage(flight, "settle"):
                self._settler.settle(flight.message, flight.receiver, decision, job, flight.job_id, error)
        finally:  # in flight no more, whatever the settlement did
            if flight.labels is not None and flight.claimed_at is not None:
                ended, code = outcome(decision, error)
                run = time.monotonic() - flight.claimed_at
                metrics.job_settled(flight.labels, ended, code, run)
                attributes: dict[str, str | float] = {metrics.SPAN_OUTCOME: ended, metrics.SPAN_CODE: code,
                                                      metrics.SPAN_RUN: run}  # fmt: skip
                flight.span.set_attributes(attributes)
        if job is not None:
            self._presence.released(job.job_id)
        if error is not None and not isinstance(error, Exception | Interrupted) and self._fatal is None:
            self._fatal = error  # receive no more; re-raised by run once everything in hand is settled

    def _claimed(self, flight: Flight, job: Job) -> None:
        """The attempt's metric dimensions, its span's attributes, its queue wait (the job's first attempt only)."""
        labels = flight.labels = metrics.JobLabels(
            str(job.params.get("analysis", "")), job.priority, self._worker_id, self._device
        )
        flight.claimed_at = time.monotonic()
        flight.span.set_attributes(labels.span_attributes())
        wait = None
        if job.attempts == 1:
            wait = ((job.started_at or datetime.now(UTC)) - job.created_at).total_seconds()
            flight.span.set_attribute(metrics.SPAN_QUEUE_WAIT, wait)
        metrics.job_claimed(labels, wait)

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
            self._presence.holding(job.job_id)
            self._notifier.flush(job)  # never raises: what it cannot hand on, the reconciler sweeps
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

    def _guard(self, flight: Flight, job: Job) -> AttemptGuard:
        return AttemptGuard(
            self._jobs,
            job,
            lease=self._limits.lease,
            timeout=self._limits.timeout,
            interrupt=functools.partial(self._interrupt, flight),
            hard_exit_after=self._limits.hard_exit_after,
            forced=self._shutdown.forced,
            on_stop=functools.partial(self._withdraw, flight),
        )

    def _withdraw(self, flight: Flight) -> None:
        """The attempt is lost or its cancellation was requested (seen by its guard): if it waits for the main
        thread, settle it now rather than once its turn comes."""
        pipeline, guard = self._pipeline, flight.guard
        if pipeline is None or guard is None:
            return
        try:
            guard.check()
        except BaseException as e:  # Cancelled or AttemptLost: what the settlement decides on
            if pipeline.withdraw(flight, e):
                logger.info("job %s: settled without waiting for its analysis (%s)", flight.job_id, type(e).__name__,
                            extra={**flight.fields, "action": "withdrawn"})  # fmt: skip

    @contextlib.contextmanager
    def _interruptible(self, flight: Flight) -> Iterator[None]:
        """In the main thread, the signal-interruptible block with ``flight`` as the one analysed there. Elsewhere
        nothing interrupts the thread: only a forced shutdown already under way stops it here, as it would there;
        later ones, and the time limit, stop it at its next checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            if self._shutdown.forced.is_set():
                raise Interrupted("shutdown forced before the job started")
            yield
            return
        with self._shutdown.interruptible(), self._analysing_now(flight):
            yield

    @contextlib.contextmanager
    def _analysing_now(self, flight: Flight) -> Iterator[None]:
        with self._analysing_lock:
            self._analysing = flight
        try:
            yield
        finally:
            with self._analysing_lock:
                self._analysing = None

    def _interrupt(self, flight: Flight, error: BaseException) -> None:
        """The attempt's time limit: interrupt the main thread if this flight is the one it analyses; otherwise (in
        another computing thread, or not being analysed) the flight's next checkpoint raises
        (:meth:`AttemptGuard.check`)."""
        with self._analysing_lock:
            if self._analysing is flight:
                self._shutdown.interrupt(error)
