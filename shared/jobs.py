"""The job record and the repository interface the Functions and the worker use.

``shared.db.PostgresJobRepository`` implements it on PostgreSQL; ``shared.memory.InMemoryJobRepository`` implements
it for unit tests of pure logic.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class Job(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: UUID
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    attempts: int
    input_blob: str
    input_sha256: str
    params: dict[str, Any]  # bands, scale, analysis: what the message carries
    idempotency_key: str | None = None
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    enqueued_at: datetime | None = None  # when the submit path (or the sweeper) last handed the message to the bus


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with different content."""

    def __init__(self, existing: Job) -> None:
        super().__init__(f"idempotency key already used for job {existing.job_id} with different content")
        self.existing = existing


class JobRepository(Protocol):
    def create(
        self,
        *,
        job_id: UUID,
        input_blob: str,
        input_sha256: str,
        params: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; return ``(job, created)``. An existing key with the same sha256 returns the existing
        job and ``False``; with another sha256 raises :class:`IdempotencyConflict`."""
        ...

    def get(self, job_id: UUID) -> Job | None: ...

    def start_attempt(self, job_id: UUID) -> Job | None:
        """Mark ``processing`` and count the attempt, unless the job is already terminal; return the job as it is
        now (``None`` if unknown). A job ``failed`` with ``enqueue_failed`` is started too: its message was delivered,
        so the send that reported failure reached the broker after all, and the job was never run."""
        ...

    def succeed(self, job_id: UUID, result: dict[str, Any]) -> bool:
        """Store the result and mark ``succeeded`` in one transaction; ``False`` if it already had a result."""
        ...

    def fail(self, job_id: UUID, code: str, message: str) -> bool:
        """Mark ``failed`` unless already terminal; ``False`` if nothing changed."""
        ...

    def requeue_enqueue_failed(self, job_id: UUID) -> Job | None:
        """Atomically set a job that is ``failed`` with code ``enqueue_failed`` back to ``queued`` (error cleared,
        ``enqueued_at`` cleared); return it, or ``None`` if it was in any other state (nothing changed). Only the
        caller that gets the job back may hand it over again."""
        ...

    def mark_enqueued(self, job_id: UUID) -> bool:
        """Record that the job's message was sent (``enqueued_at = now``); ``False`` if the job is unknown."""
        ...

    def stale_unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        """``queued`` jobs never recorded as sent (``enqueued_at`` unset) created more than ``older_than`` ago,
        oldest first, at most ``limit``: submits that died between the insert and the send."""
        ...
