"""The job record and the job store's interface.

The job's lifecycle (its states, the events that move it, and the conditional UPDATE of each) is
:mod:`shared.lifecycle`; ``shared.db.PostgresJobStore`` implements this interface with it on PostgreSQL.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict

Priority = Literal["high", "normal"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(BaseModel):
    """One row of ``jobs`` (with its result, if any). ``charged``: the attempts that count against the limit."""

    model_config = ConfigDict(frozen=True)

    job_id: UUID
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    input_blob: str
    input_sha256: str
    params: dict[str, Any]  # bands, scale, analysis: what the message carries
    idempotency_key: str | None = None
    generation: int = 1  # the current hand-over to the bus; its message id is "{job_id}:{generation}"
    sent_at: datetime | None = None  # when the current generation's send was confirmed (None: not confirmed)
    attempts: int = 0  # attempts claimed so far; the running (or last) attempt's number
    drains: int = 0  # attempts released by a drain (shutdown, eviction): not charged against JOB_MAX_ATTEMPTS
    worker_id: str | None = None  # who holds (or last held) the attempt
    lease_until: datetime | None = None  # a running attempt's lease; past it, the attempt may be taken over
    started_at: datetime | None = None  # the last attempt's start
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    priority: Priority = "normal"  # which queue carries its messages
    batch_id: UUID | None = None
    cancel_requested_at: datetime | None = None  # a running job's cancellation was requested
    progress: dict[str, Any] | None = None  # {stage, fraction, updated_at} of the running (or last) attempt
    retries: int = 0  # manual retries (POST /api/jobs/{id}/retry)
    forgiven: int = 0  # attempts a manual retry forgave: not charged either
    first_started_at: datetime | None = None  # the first attempt's start (queue wait = first_started_at - created_at)
    callback_url: str | None = None
    callback_events: list[str] | None = None  # webhook event groups (None: completed only)

    @property
    def charged(self) -> int:
        return self.attempts - self.drains - self.forgiven


class Callback(BaseModel):
    """Where a job's webhooks go, which event groups, and the secret they are signed with."""

    model_config = ConfigDict(frozen=True)

    url: str
    events: list[str] | None = None  # None: completed only
    secret: str


class NewJob(BaseModel):
    """A job to insert (one of a batch)."""

    model_config = ConfigDict(frozen=True)

    job_id: UUID
    input_blob: str
    input_sha256: str
    params: dict[str, Any]
    priority: Priority = "normal"
    callback: Callback | None = None


class JobFilter(BaseModel):
    """``GET /api/jobs`` filters; ``after``: the keyset cursor (the last row of the previous page)."""

    model_config = ConfigDict(frozen=True)

    status: JobStatus | None = None
    analysis: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    batch_id: UUID | None = None
    after: tuple[datetime, UUID] | None = None


class DeadLetter(BaseModel):
    """A message the reconciler drained from the dead-letter sub-queue, and what it did with the job."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    sequence_number: int
    job_id: UUID | None
    generation: int | None
    reason: str | None
    description: str | None
    delivery_count: int | None
    enqueued_at: datetime | None
    action: str = "none"  # what the reconciler did with the job: redrive | failed | none


class RecordedDeadLetter(DeadLetter):
    """A dead letter as the ``dead_letters`` table keeps it, with its job's status now (``None``: no such job)."""

    received_at: datetime
    job_status: JobStatus | None = None


class DeadLetterFilter(BaseModel):
    """Which recorded dead letters to read (``GET /api/dead-letters``, the replay)."""

    model_config = ConfigDict(frozen=True)

    reason: str | None = None
    action: str | None = None
    job_status: JobStatus | None = None


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with different content."""

    def __init__(self, existing: Job) -> None:
        super().__init__(f"idempotency key already used for job {existing.job_id} with different content")
        self.existing = existing


class JobStore(Protocol):
    """Jobs in the database. Every status change is an event of :mod:`shared.lifecycle`: a conditional update that
    returns the job as it now is, or ``None`` when the job was not in a state (or attempt, or generation) that allows
    the event, in which case nothing changed."""

    def create(
        self,
        *,
        job_id: UUID,
        input_blob: str,
        input_sha256: str,
        params: dict[str, Any],
        idempotency_key: str | None,
        priority: Priority = "normal",
        callback: Callback | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job (generation 1, send not confirmed); return ``(job, created)``. An existing key with the
        same sha256 and params returns the existing job and ``False``; with another sha256, or other params (bands,
        scale, analysis, fields: a request with other options), raises :class:`IdempotencyConflict`."""
        ...

    def create_batch(self, batch_id: UUID, jobs: list[NewJob], idempotency_key: str | None) -> tuple[list[Job], bool]:
        """Insert all of ``jobs`` (queued, in ``batch_id``, in this order) or none, the batch unsealed; return
        ``(jobs, created)``. An existing key returns that batch's jobs and ``False`` (whatever ``jobs`` holds)."""
        ...

    def batch_jobs(self, batch_id: UUID) -> list[Job] | None:
        """The jobs of a batch in the order ``create_batch`` was given them, or ``None`` if there is no such batch."""
        ...

    def seal_batch(self, batch_id: UUID, stored: Collection[UUID]) -> bool:
        """Seal the batch (its jobs may be sent from now on), if every queued job of it is in ``stored`` (the caller
        stored their images) and none was aborted (``enqueue_failed``); serialised with :meth:`abort_batch`. Whether
        the batch is sealed (now or before)."""
        ...

    def abort_batch(self, batch_id: UUID, message: str, older_than: timedelta | None = None) -> list[Job]:
        """``abort_submit`` every queued job of an unsealed batch (its current generation, ``enqueue_failed``), in one
        transaction serialised with :meth:`seal_batch`; with ``older_than``, only if none of them changed for that
        long. The jobs it failed (none when the batch is sealed or too recent)."""
        ...

    def webhook_secret(self, job_id: UUID) -> str | None:
        """The secret a job's webhooks are signed with (never part of :class:`Job`)."""
        ...

    def find(self, where: JobFilter, limit: int) -> list[Job]:
        """Jobs matching ``where``, newest first (``created_at``, then ``job_id``, descending), at most ``limit``."""
        ...

    def backlog(self) -> int:
        """The number of queued jobs (admission control)."""
        ...

    def find_by_key(self, idempotency_key: str) -> Job | None:
        """The job created with ``idempotency_key``, if any (admission control lets its replays through)."""
        ...

    def batch_by_key(self, idempotency_key: str) -> UUID | None:
        """The batch created with ``idempotency_key``, if any."""
        ...

    def dead_letter_log(self, where: DeadLetterFilter, limit: int) -> list[RecordedDeadLetter]:
        """Recorded dead letters matching ``where``, newest first, at most ``limit``."""
        ...

    def get(self, job_id: UUID) -> Job | None: ...

    def ping(self) -> None:
        """Raise :class:`~shared.errors.DatabaseUnavailable` unless the database answers."""
        ...

    # Submission
    def confirm_sent(self, job_id: UUID, generation: int) -> Job | None: ...
    def abort_submit(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None: ...
    def resubmit(self, job_id: UUID) -> Job | None: ...

    # Worker (fenced by the attempt number)
    def claim(self, job_id: UUID, *, worker_id: str, lease: timedelta, max_attempts: int) -> Job | None: ...
    def renew_lease(self, job_id: UUID, attempt: int, lease: timedelta) -> Job | None: ...
    def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> Job | None: ...
    def fail(self, job_id: UUID, attempt: int, code: str, message: str) -> Job | None: ...
    def release(self, job_id: UUID, attempt: int, *, drain: bool = False) -> Job | None: ...

    def progress(self, job_id: UUID, attempt: int, progress: dict[str, Any], *, notify: bool = False) -> Job | None: ...
    def stop(self, job_id: UUID, attempt: int) -> Job | None: ...

    # Control (the API)
    def cancel(self, job_id: UUID) -> Job | None: ...
    def request_cancel(self, job_id: UUID) -> Job | None: ...
    def retry(self, job_id: UUID) -> Job | None: ...

    # Reconciler
    def resend(self, job_id: UUID, generation: int, older_than: timedelta) -> Job | None: ...
    def expire(self, job_id: UUID, max_attempts: int) -> Job | None: ...
    def exhaust(self, job_id: UUID, max_attempts: int, message: str) -> Job | None: ...
    def redrive(self, job_id: UUID, generation: int) -> Job | None: ...
    def dead_lettered(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None: ...
    def cancel_expired(self, job_id: UUID) -> Job | None: ...

    # Reconciler queries (read only; each candidate is then moved by its conditional event)
    def unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        """``queued`` jobs whose current send is not confirmed and that have not changed for ``older_than``; none of
        an unsealed batch (nothing of it may be sent)."""
        ...

    def unsealed(self, older_than: timedelta, limit: int) -> list[UUID]:
        """Unsealed batches with queued jobs, none of which changed for ``older_than`` (their submit died)."""
        ...

    def expired(self, limit: int) -> list[Job]:
        """``running`` jobs whose lease has run out (cancelling ones included), oldest lease first."""
        ...

    def stranded(self, max_attempts: int, limit: int) -> list[Job]:
        """``queued`` jobs that no claim can take any more (``attempts - drains >= max_attempts``)."""
        ...

    def record_dead_letter(self, letter: DeadLetter) -> bool:
        """Keep a drained dead letter; ``False`` if it was recorded before (the DLQ delivered it again)."""
        ...
