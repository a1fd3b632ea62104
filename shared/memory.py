"""In-memory implementations of the job repository, the input store and the publisher, for unit tests of pure logic.

They follow the same contracts as :class:`shared.db.PostgresJobRepository`, :class:`shared.storage.BlobStore` and
:class:`shared.bus.JobPublisher` (the integration tests hold the real ones to the same behaviour). ``failure``
attributes make a store or a publisher raise, so failure paths can be tested without a broken backend.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from shared.errors import InputMissing
from shared.jobs import IdempotencyConflict, Job, JobStatus
from shared.messages import JobMessage

_ACTIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)


class InMemoryJobRepository:
    def __init__(self) -> None:
        self._jobs: dict[UUID, Job] = {}
        self._lock = threading.Lock()

    def create(
        self,
        *,
        job_id: UUID,
        input_blob: str,
        input_sha256: str,
        params: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        with self._lock:
            existing = self._by_key(idempotency_key)
            if existing is not None:
                if existing.input_sha256 != input_sha256:
                    raise IdempotencyConflict(existing)
                return existing, False
            now = datetime.now(UTC)
            job = Job(
                job_id=job_id,
                status=JobStatus.QUEUED,
                created_at=now,
                updated_at=now,
                attempts=0,
                input_blob=input_blob,
                input_sha256=input_sha256,
                params=params,
                idempotency_key=idempotency_key,
            )
            self._jobs[job_id] = job
            return job, True

    def _by_key(self, key: str | None) -> Job | None:
        return next((j for j in self._jobs.values() if key is not None and j.idempotency_key == key), None)

    def get(self, job_id: UUID) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start_attempt(self, job_id: UUID) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            sent_after_all = job is not None and job.status is JobStatus.FAILED and job.error_code == "enqueue_failed"
            if job is not None and (job.status in _ACTIVE or sent_after_all):
                job = self._update(
                    job, status=JobStatus.PROCESSING, attempts=job.attempts + 1, error_code=None, error_message=None
                )
            return job

    def succeed(self, job_id: UUID, result: dict[str, Any]) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status not in _ACTIVE:
                return False
            self._update(job, status=JobStatus.SUCCEEDED, result=result, error_code=None, error_message=None)
            return True

    def fail(self, job_id: UUID, code: str, message: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status not in _ACTIVE:
                return False
            self._update(job, status=JobStatus.FAILED, error_code=code, error_message=message)
            return True

    def requeue_enqueue_failed(self, job_id: UUID) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status is not JobStatus.FAILED or job.error_code != "enqueue_failed":
                return None
            return self._update(job, status=JobStatus.QUEUED, error_code=None, error_message=None, enqueued_at=None)

    def mark_enqueued(self, job_id: UUID) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            self._jobs[job_id] = job.model_copy(update={"enqueued_at": datetime.now(UTC)})
            return True

    def stale_unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        cutoff = datetime.now(UTC) - older_than
        with self._lock:
            stale = [
                j
                for j in self._jobs.values()
                if j.status is JobStatus.QUEUED and j.enqueued_at is None and j.created_at < cutoff
            ]
        return sorted(stale, key=lambda j: j.created_at)[:limit]

    def _update(self, job: Job, **changes: Any) -> Job:
        job = job.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
        self._jobs[job.job_id] = job
        return job


class InMemoryBlobStore:
    """Inputs by blob name; read URLs carry a fake ``se=`` expiry so tests can see they were signed."""

    base_url = "memory://account"

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.failure: Exception | None = None

    def put_input(self, job_id: UUID, data: bytes, sha256: str) -> str:
        if self.failure is not None:
            raise self.failure
        name = f"{job_id}/input.tif"
        self.blobs[f"images/{name}"] = (data, {"sha256": sha256})
        return name

    def input_sha256(self, blob_name: str) -> str | None:
        if self.failure is not None:
            raise self.failure
        blob = self.blobs.get(f"images/{blob_name}")
        if blob is None:
            raise InputMissing(f"input blob {blob_name} not found")
        return blob[1].get("sha256")

    def read_url(self, blob_url: str, ttl: timedelta) -> str:
        if self.failure is not None:
            raise self.failure
        return f"{blob_url}?se={int(ttl.total_seconds())}"


class InMemoryPublisher:
    def __init__(self) -> None:
        self.sent: list[JobMessage] = []
        self.failure: Exception | None = None

    def send(self, message: JobMessage) -> None:
        if self.failure is not None:
            raise self.failure
        self.sent.append(message)
