"""In-memory job store, input store and publisher, for unit tests of pure logic.

:class:`InMemoryJobStore` is held to the same contract as :class:`shared.db.PostgresJobStore`
(``tests/contracts/job_store.py`` runs against both): each event checks the source states with
:func:`shared.lifecycle.target` and its guard in Python. ``failure`` attributes make a store or a publisher raise,
so failure paths can be tested without a broken backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from shared.errors import InputMissing
from shared.jobs import DeadLetter, IdempotencyConflict, Job, JobStatus
from shared.lifecycle import Event, target
from shared.messages import JobMessage

Q, R = JobStatus.QUEUED, JobStatus.RUNNING


class InMemoryJobStore:
    def __init__(self) -> None:
        self._jobs: dict[UUID, Job] = {}
        self._lock = threading.Lock()
        self.dead_letters: dict[tuple[str, int], DeadLetter] = {}
        self.failure: Exception | None = None

    def create(
        self, *, job_id: UUID, input_blob: str, input_sha256: str, params: dict[str, Any], idempotency_key: str | None
    ) -> tuple[Job, bool]:
        self._fail_if_broken()
        with self._lock:
            existing = next(
                (
                    j
                    for j in self._jobs.values()
                    if idempotency_key is not None and j.idempotency_key == idempotency_key
                ),
                None,
            )
            if existing is not None:
                if existing.input_sha256 != input_sha256:
                    raise IdempotencyConflict(existing)
                return existing, False
            now = datetime.now(UTC)
            job = Job(
                job_id=job_id,
                status=Q,
                created_at=now,
                updated_at=now,
                input_blob=input_blob,
                input_sha256=input_sha256,
                params=params,
                idempotency_key=idempotency_key,
            )
            self._jobs[job_id] = job
            return job, True

    def get(self, job_id: UUID) -> Job | None:
        self._fail_if_broken()
        return self._jobs.get(job_id)

    def ping(self) -> None:
        self._fail_if_broken()

    def _fail_if_broken(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _move(self, event: Event, job_id: UUID, guard: Callable[[Job, datetime], bool], **changes: Any) -> Job | None:
        self._fail_if_broken()
        with self._lock:
            job = self._jobs.get(job_id)
            now = datetime.now(UTC)
            if job is None or (status := target(job.status, event)) is None or not guard(job, now):
                return None
            computed = {k: v(job, now) if callable(v) else v for k, v in changes.items()}
            moved = job.model_copy(update={"status": status, "updated_at": now, **computed})
            self._jobs[job_id] = moved
            return moved

    def confirm_sent(self, job_id: UUID, generation: int) -> Job | None:
        return self._move(
            Event.CONFIRM_SENT, job_id, lambda j, _: j.generation == generation and j.sent_at is None,
            sent_at=lambda _, now: now,
        )  # fmt: skip

    def abort_submit(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None:
        return self._move(
            Event.ABORT_SUBMIT, job_id,
            lambda j, _: j.generation == generation and j.sent_at is None and j.attempts == 0,
            error_code=code, error_message=message, finished_at=lambda _, now: now,
        )  # fmt: skip

    def resubmit(self, job_id: UUID) -> Job | None:
        return self._move(
            Event.RESUBMIT, job_id, lambda j, _: j.error_code == "enqueue_failed",
            generation=lambda j, _: j.generation + 1, sent_at=None, error_code=None, error_message=None,
            finished_at=None,
        )  # fmt: skip

    def claim(self, job_id: UUID, *, worker_id: str, lease: timedelta, max_attempts: int) -> Job | None:
        return self._move(
            Event.CLAIM, job_id,
            lambda j, now: (j.status is Q or _expired(j, now)) and j.charged < max_attempts,
            attempts=lambda j, _: j.attempts + 1, worker_id=worker_id, lease_until=lambda _, now: now + lease,
            started_at=lambda _, now: now, sent_at=lambda j, now: j.sent_at or now,
        )  # fmt: skip

    def renew_lease(self, job_id: UUID, attempt: int, lease: timedelta) -> Job | None:
        return self._move(
            Event.RENEW_LEASE, job_id, lambda j, _: j.attempts == attempt, lease_until=lambda _, now: now + lease
        )

    def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> Job | None:
        return self._move(
            Event.SUCCEED, job_id, lambda j, _: j.attempts == attempt,
            result=result, lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def fail(self, job_id: UUID, attempt: int, code: str, message: str) -> Job | None:
        return self._move(
            Event.FAIL, job_id, lambda j, _: j.attempts == attempt,
            error_code=code, error_message=message, lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def release(self, job_id: UUID, attempt: int, *, drain: bool = False) -> Job | None:
        return self._move(
            Event.RELEASE, job_id, lambda j, _: j.attempts == attempt,
            generation=lambda j, _: j.generation + 1, sent_at=None, lease_until=None,
            drains=lambda j, _: j.drains + int(drain),
        )  # fmt: skip

    def cancel(self, job_id: UUID) -> Job | None:
        return self._move(Event.CANCEL, job_id, lambda j, _: True, lease_until=None, finished_at=lambda _, now: now)

    def resend(self, job_id: UUID, generation: int, older_than: timedelta) -> Job | None:
        return self._move(
            Event.RESEND, job_id,
            lambda j, now: j.generation == generation and j.sent_at is None and j.updated_at < now - older_than,
            generation=lambda j, _: j.generation + 1, sent_at=None,
        )  # fmt: skip

    def expire(self, job_id: UUID, max_attempts: int) -> Job | None:
        return self._move(
            Event.EXPIRE, job_id, lambda j, now: _expired(j, now) and j.charged < max_attempts,
            generation=lambda j, _: j.generation + 1, sent_at=None, lease_until=None,
        )  # fmt: skip

    def exhaust(self, job_id: UUID, max_attempts: int, message: str) -> Job | None:
        return self._move(
            Event.EXHAUST, job_id,
            lambda j, now: j.charged >= max_attempts and (j.status is Q or _expired(j, now)),
            error_code="retries_exhausted", error_message=message, lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def redrive(self, job_id: UUID, generation: int) -> Job | None:
        return self._move(
            Event.REDRIVE, job_id, lambda j, _: j.generation == generation,
            generation=lambda j, _: j.generation + 1, sent_at=None,
        )  # fmt: skip

    def dead_lettered(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None:
        return self._move(
            Event.DEAD_LETTERED, job_id, lambda j, _: j.generation == generation,
            error_code=code, error_message=message, finished_at=lambda _, now: now,
        )  # fmt: skip

    def unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        now = self._now()
        found = [
            j for j in self._jobs.values() if j.status is Q and j.sent_at is None and j.updated_at < now - older_than
        ]
        return sorted(found, key=lambda j: j.updated_at)[:limit]

    def expired(self, limit: int) -> list[Job]:
        now = self._now()
        found = [j for j in self._jobs.values() if _expired(j, now)]
        return sorted(found, key=lambda j: j.lease_until or now)[:limit]

    def stranded(self, max_attempts: int, limit: int) -> list[Job]:
        self._fail_if_broken()
        found = [j for j in self._jobs.values() if j.status is Q and j.charged >= max_attempts]
        return sorted(found, key=lambda j: j.created_at)[:limit]

    def record_dead_letter(self, letter: DeadLetter) -> bool:
        self._fail_if_broken()
        key = (letter.message_id, letter.sequence_number)
        if key in self.dead_letters:
            return False
        self.dead_letters[key] = letter
        return True

    def _now(self) -> datetime:
        self._fail_if_broken()
        return datetime.now(UTC)


def _expired(job: Job, now: datetime) -> bool:
    return job.status is R and job.lease_until is not None and job.lease_until < now


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
        self.sent: list[tuple[JobMessage, datetime | None]] = []
        self.failure: Exception | None = None

    @property
    def messages(self) -> list[JobMessage]:
        return [m for m, _ in self.sent]

    def send(self, message: JobMessage, *, at: datetime | None = None) -> None:
        if self.failure is not None:
            raise self.failure
        self.sent.append((message, at))
