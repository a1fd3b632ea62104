"""The reconciler: what heals jobs that no message, no worker or no broker will move on their own.

It runs as a timer-triggered Function (``functions/reconciler.py``), so it works with zero workers. Each run does
five bounded, idempotent steps, every job change being a conditional event of :mod:`shared.lifecycle`:

1. **Unconfirmed sends.** A ``queued`` job whose send was never confirmed for ``resend_after`` (the submit died
   between insert and send, or the send was ambiguous) gets a new generation and its message is sent. A job never
   attempted whose image is missing (the submit died before the upload) is failed ``enqueue_failed`` instead, once
   it is older than any submit can run (``abort_after``). Nothing of an unsealed batch is sent (its submit has not
   stored every image: :mod:`shared.batches`); once none of its queued jobs changed for ``abort_after``, its submit
   died, and the whole batch is aborted: every queued job failed ``enqueue_failed``, whatever its image.
2. **Expired leases.** A ``running`` job whose lease ran out (its worker died or hung) is queued again with a new
   generation and sent, or failed ``retries_exhausted`` when its attempts are used up. One whose cancellation was
   requested is cancelled (``cancel_expired``): its attempt will never reach the checkpoint that would stop it.
3. **Stranded jobs.** A ``queued`` job no claim can take (attempts used up, e.g. after ``JOB_MAX_ATTEMPTS`` was
   lowered) is failed ``retries_exhausted``.
4. **Dead letters.** Messages in the queue's dead-letter sub-queue are *received* (incrementally: each once), their
   job reconciled, the letter recorded in ``dead_letters`` and completed. Only a letter of the job's *current*
   generation, while the job is still ``queued``, can move it: ``MaxDeliveryCountExceeded`` (deliveries spent on
   crashes and outages, never on a claim) re-drives it with a new generation; ``TTLExpiredException`` fails it
   ``message_expired``; a poison message (``InvalidMessage``) fails it ``invalid_message``. A letter of an older
   generation, or of a job that is running or finished, changes nothing (a later copy may be mid-run).
5. **Webhook events.** ``job_events`` rows left unsent for ``events_after`` (the notifier of the transition crashed
   or could not reach the bus) are handed to the job-events queue (:meth:`shared.events.Outbox.sweep`); a pending
   event whose next delivery attempt was due ``events_stalled_after`` ago and never came (its message was
   dead-lettered, or never sent) has that attempt's message sent again (:meth:`shared.events.Outbox.resume`).

A job the reconciler fails or cancels (``exhaust``, ``dead_lettered``, ``cancel_expired``: events that notify) has its
webhook events flushed at once; a flush that fails is left to step 5.

Sends follow the outbox order: the event commits (new generation, send unconfirmed), then the message is sent, then
the send is confirmed. A run that dies in between leaves the job to step 1 of a later run. A backend error ends the
step it happened in; the next run starts again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from pydantic import Field

from shared import metrics
from shared.errors import CropAIError, InputMissing, InvalidImage, InvalidMessage, UnknownAnalysis
from shared.jobs import DeadLetter, Job, JobStore
from shared.messages import JobMessage
from shared.submission import EnqueueFailed, Publisher

if TYPE_CHECKING:
    from shared.events import Outbox

log = logging.getLogger(__name__)

RETRIES_EXHAUSTED = "retries_exhausted"
STALL_MARGIN = timedelta(minutes=5)  # past the longest wait a webhook's next message may have (see Policy)
REDRIVE_REASONS = frozenset({"MaxDeliveryCountExceeded"})
# Dead-letter reason -> the code a still-queued job of that generation fails with.
FAIL_CODES = {
    "TTLExpiredException": "message_expired",
    **{cls.__name__: cls.code for cls in (InvalidMessage, InvalidImage, InputMissing, UnknownAnalysis)},
}


class InputChecker(Protocol):
    def input_sha256(self, blob_name: str) -> str | None:
        """The stored input's SHA-256 metadata; raises InputMissing when the blob is not there."""
        ...


class Letter(DeadLetter):
    """A received dead letter, not reconciled yet, with the inbox's handle for completing it (the SDK message)."""

    token: object = Field(exclude=True)


class DeadLetterInbox(Protocol):
    def receive(self, max_count: int) -> list[Letter]: ...
    def complete(self, letter: Letter) -> None: ...


@dataclass
class Report:
    resent: int = 0
    aborted: int = 0
    requeued: int = 0
    exhausted: int = 0
    redriven: int = 0
    dead_letters: int = 0
    dead_lettered_failed: int = 0
    cancelled: int = 0
    events_sent: int = 0  # webhook events the sweep handed over
    events_resumed: int = 0  # stalled webhook deliveries whose next attempt was sent again
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        moved = self.resent + self.aborted + self.requeued + self.exhausted + self.redriven + self.dead_lettered_failed
        return moved + self.cancelled + self.events_sent + self.events_resumed


@dataclass(frozen=True)
class Policy:
    resend_after: timedelta
    max_attempts: int
    batch: int
    # A never-attempted job whose image is missing is failed only this long after its submit: longer than a submit
    # may run (host.json's functionTimeout, 5 min), so an upload still in flight is never taken for a dead submit.
    abort_after: timedelta
    # A webhook event unsent this long is the sweep's: its notifier crashed or failed (it flushes within a second).
    events_after: timedelta = timedelta(seconds=30)
    # A pending webhook event whose next attempt was due this long ago lost its message: longer than a message put
    # off by a database outage may wait (WEBHOOK_BACKOFF_MAX), plus STALL_MARGIN.
    events_stalled_after: timedelta = timedelta(minutes=10) + STALL_MARGIN


class Reconciler:
    def __init__(
        self,
        jobs: JobStore,
        store: InputChecker,
        publisher: Publisher,
        inbox: DeadLetterInbox,
        policy: Policy,
        outbox: Outbox,
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._publisher = publisher
        self._inbox = inbox
        self._policy = policy
        self._outbox = outbox

    def run(self) -> Report:
        report = Report()
        for step in (self._unconfirmed, self._expired, self._stranded, self._dead_letters, self._events, self._backlog):
            try:
                step(report)
            except Exception as e:  # a backend is down (or a bug): the other steps still run; the next run retries
                code = e.code if isinstance(e, CropAIError) else type(e).__name__
                report.errors.append(f"{step.__name__.lstrip('_')}: {code}")
                log.warning("reconcile step %s stopped: %s", step.__name__, e, exc_info=not isinstance(e, CropAIError),
                            extra={"action": "reconcile_failed"})  # fmt: skip
        log.log(
            logging.WARNING if report.changed else logging.INFO,
            "reconciled: %s",
            report,
            extra={"action": "reconciled", "changed": report.changed},
        )
        return report

    def _unconfirmed(self, report: Report) -> None:
        self._unsealed(report)
        for job in self._jobs.unsent(self._policy.resend_after, self._policy.batch):
            if job.charged >= self._policy.max_attempts:  # stranded: step 3 fails it, sending it would be waste
                continue
            if job.attempts == 0 and not self._image_stored(job):
                if datetime.now(UTC) - job.updated_at < self._policy.abort_after:
                    continue  # the submit may still be uploading: wait, it sends the message itself
                if self._jobs.abort_submit(
                    job.job_id, job.generation, EnqueueFailed.code, "the image was never stored; submit it again"
                ):
                    report.aborted += 1
                continue
            moved = self._jobs.resend(job.job_id, job.generation, self._policy.resend_after)
            if moved is not None:
                self._send(moved, "resend")
                report.resent += 1

    def _unsealed(self, report: Report) -> None:
        """Abort the unsealed batches whose submit died (their jobs are never in ``unsent``)."""
        for batch_id in self._jobs.unsealed(self._policy.abort_after, self._policy.batch):
            why = "the batch was never stored whole; submit it again"
            aborted = self._jobs.abort_batch(batch_id, why, older_than=self._policy.abort_after)
            if aborted:
                extra = {"batch_id": str(batch_id), "action": "batch_aborted", "count": len(aborted)}
                log.warning("batch %s aborted: %d jobs failed", batch_id, len(aborted), extra=extra)
            report.aborted += len(aborted)

    def _expired(self, report: Report) -> None:
        for job in self._jobs.expired(self._policy.batch):
            if job.cancel_requested_at is not None:  # expire and exhaust refuse a job being cancelled
                if self._notified(self._jobs.cancel_expired(job.job_id)):
                    report.cancelled += 1
                continue
            moved = self._jobs.expire(job.job_id, self._policy.max_attempts)
            if moved is not None:
                self._send(moved, "expire")
                report.requeued += 1
            elif self._exhaust(job, f"the lease of attempt {job.attempts} ran out and no attempt is left"):
                report.exhausted += 1

    def _stranded(self, report: Report) -> None:
        for job in self._jobs.stranded(self._policy.max_attempts, self._policy.batch):
            if self._exhaust(job, f"{job.attempts} attempts used; no attempt is left"):
                report.exhausted += 1

    def _dead_letters(self, report: Report) -> None:
        for letter in self._inbox.receive(self._policy.batch):
            action = self._reconcile_letter(letter)
            report.dead_letters += 1
            report.redriven += action == "redrive"
            report.dead_lettered_failed += action == "failed"
            self._jobs.record_dead_letter(DeadLetter(**{**letter.model_dump(), "action": action}))
            self._inbox.complete(letter)

    def _backlog(self, report: Report) -> None:
        """Read the number of queued jobs for ``crop_ai.jobs.queued``: every run, so the workers-silent alert sees a
        backlog even while nobody submits (admission control reads it only on submits)."""
        metrics.queued_seen(self._jobs.backlog())

    def _reconcile_letter(self, letter: Letter) -> str:
        if letter.job_id is None or letter.generation is None:
            return "none"
        if letter.reason in REDRIVE_REASONS:
            moved = self._jobs.redrive(letter.job_id, letter.generation)
            if moved is None:
                return "none"
            self._send(moved, "redrive")
            return "redrive"
        code = FAIL_CODES.get(letter.reason or "")
        if code is None:  # our own dead letters (RetriesExhausted, TimedOut...): the worker failed the job first
            return "none"
        text = f"message dead-lettered ({letter.reason}): {letter.description or 'no description'}"[:1000]
        failed = self._jobs.dead_lettered(letter.job_id, letter.generation, code, text)
        return "failed" if self._notified(failed) else "none"

    def _events(self, report: Report) -> None:
        report.events_sent += self._outbox.sweep(self._policy.events_after, self._policy.batch)
        report.events_resumed += self._outbox.resume(self._policy.events_stalled_after, self._policy.batch)

    def _exhaust(self, job: Job, why: str) -> bool:
        return self._notified(self._jobs.exhaust(job.job_id, self._policy.max_attempts, why))

    def _notified(self, moved: Job | None) -> bool:
        """Whether an event that notifies moved the job; if it did, its webhook events are flushed (never raises)."""
        if moved is not None:
            self._outbox.flush(moved)
        return moved is not None

    def _image_stored(self, job: Job) -> bool:
        try:
            self._store.input_sha256(job.input_blob)
        except InputMissing:
            return False
        return True

    def _send(self, job: Job, action: str) -> None:
        message = JobMessage.for_job(job)
        extra = {"job_id": str(job.job_id), "message_id": message.message_id, "action": action}
        self._publisher.send(message)
        self._jobs.confirm_sent(job.job_id, job.generation)
        log.warning("job %s handed over again (%s, generation %d)", job.job_id, action, job.generation, extra=extra)
