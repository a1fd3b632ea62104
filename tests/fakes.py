"""In-memory job store, input store, publisher and worker registry, for unit tests of pure logic.

:class:`InMemoryJobStore` is held to the same contract as :class:`shared.db.PostgresJobStore`
(``tests/contracts/job_store.py`` runs against both): each event checks the source states with
:func:`shared.lifecycle.target` and its guard in Python. ``failure`` attributes make a store or a publisher raise,
so failure paths can be tested without a broken backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from functions.deps import Deps
from shared.errors import InputMissing
from shared.jobs import (
    Callback,
    DeadLetter,
    DeadLetterFilter,
    IdempotencyConflict,
    Job,
    JobFilter,
    JobStatus,
    NewJob,
    Priority,
    RecordedDeadLetter,
)
from shared.lifecycle import Event, target
from shared.messages import JobMessage
from shared.queue_stats import QueueCounts
from shared.settings import Settings

Q, R = JobStatus.QUEUED, JobStatus.RUNNING


class InMemoryJobStore:
    def __init__(self) -> None:
        self._jobs: dict[UUID, Job] = {}
        self._lock = threading.RLock()
        self.dead_letters: dict[tuple[str, int], DeadLetter] = {}
        self._received: dict[tuple[str, int], datetime] = {}
        self.failure: Exception | None = None
        self._secrets: dict[UUID, str | None] = {}
        self._batches: dict[UUID, list[UUID]] = {}
        self._batch_keys: dict[UUID, str | None] = {}
        self._sealed: set[UUID] = set()

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
                if existing.input_sha256 != input_sha256 or existing.params != params:
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
                priority=priority,
                callback_url=callback.url if callback else None,
                callback_events=callback.events if callback else None,
            )
            self._jobs[job_id] = job
            self._secrets[job_id] = callback.secret if callback else None
            return job, True

    def create_batch(self, batch_id: UUID, jobs: list[NewJob], idempotency_key: str | None) -> tuple[list[Job], bool]:
        self._fail_if_broken()
        with self._lock:
            existing = next((b for b, k in self._batch_keys.items() if k is not None and k == idempotency_key), None)
            if existing is not None:
                return [self._jobs[i] for i in self._batches[existing]], False
            now = datetime.now(UTC)
            for new in jobs:
                callback = new.callback
                self._jobs[new.job_id] = Job(
                    job_id=new.job_id,
                    status=Q,
                    created_at=now,
                    updated_at=now,
                    input_blob=new.input_blob,
                    input_sha256=new.input_sha256,
                    params=new.params,
                    priority=new.priority,
                    batch_id=batch_id,
                    callback_url=callback.url if callback else None,
                    callback_events=callback.events if callback else None,
                )
                self._secrets[new.job_id] = callback.secret if callback else None
            self._batches[batch_id] = [new.job_id for new in jobs]
            self._batch_keys[batch_id] = idempotency_key
            return [self._jobs[new.job_id] for new in jobs], True

    def batch_jobs(self, batch_id: UUID) -> list[Job] | None:
        self._fail_if_broken()
        ids = self._batches.get(batch_id)
        return None if ids is None else [self._jobs[i] for i in ids]

    def seal_batch(self, batch_id: UUID, stored: Collection[UUID]) -> bool:
        self._fail_if_broken()
        with self._lock:
            if batch_id not in self._batches or batch_id in self._sealed:
                return batch_id in self._sealed
            for job in (self._jobs[i] for i in self._batches[batch_id]):
                if job.error_code == "enqueue_failed" or (job.status is Q and job.job_id not in stored):
                    return False
            self._sealed.add(batch_id)
            return True

    def abort_batch(self, batch_id: UUID, message: str, older_than: timedelta | None = None) -> list[Job]:
        self._fail_if_broken()
        with self._lock:  # reentrant: abort_submit takes it too
            if batch_id not in self._batches or batch_id in self._sealed:
                return []
            queued = [j for j in (self._jobs[i] for i in self._batches[batch_id]) if j.status is Q]
            if older_than is not None and any(j.updated_at >= datetime.now(UTC) - older_than for j in queued):
                return []
            moved = (self.abort_submit(j.job_id, j.generation, "enqueue_failed", message) for j in queued)
            return [j for j in moved if j is not None]

    def webhook_secret(self, job_id: UUID) -> str | None:
        self._fail_if_broken()
        return self._secrets.get(job_id)

    def find(self, where: JobFilter, limit: int) -> list[Job]:
        self._fail_if_broken()
        found = [
            j
            for j in self._jobs.values()
            if (where.status is None or j.status is where.status)
            and (where.analysis is None or j.params.get("analysis") == where.analysis)
            and (where.created_after is None or j.created_at > where.created_after)
            and (where.created_before is None or j.created_at < where.created_before)
            and (where.batch_id is None or j.batch_id == where.batch_id)
            and (where.after is None or (j.created_at, j.job_id) < where.after)
        ]
        return sorted(found, key=lambda j: (j.created_at, j.job_id), reverse=True)[:limit]

    def backlog(self) -> int:
        self._fail_if_broken()
        return sum(j.status is Q for j in self._jobs.values())

    def find_by_key(self, idempotency_key: str) -> Job | None:
        self._fail_if_broken()
        return next((j for j in self._jobs.values() if j.idempotency_key == idempotency_key), None)

    def batch_by_key(self, idempotency_key: str) -> UUID | None:
        self._fail_if_broken()
        return next((b for b, k in self._batch_keys.items() if k == idempotency_key), None)

    def dead_letter_log(self, where: DeadLetterFilter, limit: int) -> list[RecordedDeadLetter]:
        self._fail_if_broken()
        found = []
        for key, letter in self.dead_letters.items():
            job = self._jobs.get(letter.job_id) if letter.job_id else None
            recorded = RecordedDeadLetter(
                **letter.model_dump(), received_at=self._received[key], job_status=job.status if job else None
            )
            if (
                (where.reason is None or recorded.reason == where.reason)
                and (where.action is None or recorded.action == where.action)
                and (where.job_status is None or recorded.job_status is where.job_status)
            ):
                found.append(recorded)
        found.sort(key=lambda d: (d.message_id, -d.sequence_number))
        found.sort(key=lambda d: d.received_at, reverse=True)
        return found[:limit]

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
            lambda j, now: (j.status is Q or _expired(j, now)) and j.charged < max_attempts and _not_cancelling(j),
            attempts=lambda j, _: j.attempts + 1, worker_id=worker_id, lease_until=lambda _, now: now + lease,
            started_at=lambda _, now: now, sent_at=lambda j, now: j.sent_at or now, progress=None,
            first_started_at=lambda j, now: j.first_started_at or now,
        )  # fmt: skip

    def renew_lease(self, job_id: UUID, attempt: int, lease: timedelta) -> Job | None:
        return self._move(
            Event.RENEW_LEASE, job_id, lambda j, _: j.attempts == attempt, lease_until=lambda _, now: now + lease
        )

    def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> Job | None:
        return self._move(
            Event.SUCCEED, job_id, lambda j, _: j.attempts == attempt and _not_cancelling(j),
            result=result, lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def fail(self, job_id: UUID, attempt: int, code: str, message: str) -> Job | None:
        return self._move(
            Event.FAIL, job_id, lambda j, _: j.attempts == attempt,
            error_code=code, error_message=message, lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def release(self, job_id: UUID, attempt: int, *, drain: bool = False) -> Job | None:
        return self._move(
            Event.RELEASE, job_id, lambda j, _: j.attempts == attempt and _not_cancelling(j),
            generation=lambda j, _: j.generation + 1, sent_at=None, lease_until=None,
            drains=lambda j, _: j.drains + int(drain),
        )  # fmt: skip

    def progress(self, job_id: UUID, attempt: int, progress: dict[str, Any], *, notify: bool = False) -> Job | None:
        return self._move(Event.PROGRESS, job_id, lambda j, _: j.attempts == attempt, progress=progress)

    def stop(self, job_id: UUID, attempt: int) -> Job | None:
        return self._move(
            Event.STOP, job_id, lambda j, _: j.attempts == attempt and not _not_cancelling(j),
            lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def cancel(self, job_id: UUID) -> Job | None:
        return self._move(Event.CANCEL, job_id, lambda j, _: True, lease_until=None, finished_at=lambda _, now: now)

    def request_cancel(self, job_id: UUID) -> Job | None:
        return self._move(
            Event.REQUEST_CANCEL, job_id, lambda j, _: _not_cancelling(j), cancel_requested_at=lambda _, now: now
        )

    def retry(self, job_id: UUID) -> Job | None:
        return self._move(
            Event.RETRY, job_id,
            lambda j, _: j.error_code != "enqueue_failed" and (j.batch_id is None or j.batch_id in self._sealed),
            generation=lambda j, _: j.generation + 1, sent_at=None, forgiven=lambda j, _: j.attempts - j.drains,
            retries=lambda j, _: j.retries + 1, error_code=None, error_message=None, finished_at=None,
            cancel_requested_at=None, progress=None,
        )  # fmt: skip

    def cancel_expired(self, job_id: UUID) -> Job | None:
        return self._move(
            Event.CANCEL_EXPIRED, job_id, lambda j, now: not _not_cancelling(j) and _expired(j, now),
            lease_until=None, finished_at=lambda _, now: now,
        )  # fmt: skip

    def resend(self, job_id: UUID, generation: int, older_than: timedelta) -> Job | None:
        return self._move(
            Event.RESEND, job_id,
            lambda j, now: j.generation == generation and j.sent_at is None and j.updated_at < now - older_than,
            generation=lambda j, _: j.generation + 1, sent_at=None,
        )  # fmt: skip

    def expire(self, job_id: UUID, max_attempts: int) -> Job | None:
        return self._move(
            Event.EXPIRE, job_id, lambda j, now: _expired(j, now) and j.charged < max_attempts and _not_cancelling(j),
            generation=lambda j, _: j.generation + 1, sent_at=None, lease_until=None,
        )  # fmt: skip

    def exhaust(self, job_id: UUID, max_attempts: int, message: str) -> Job | None:
        return self._move(
            Event.EXHAUST, job_id,
            lambda j, now: j.charged >= max_attempts and (j.status is Q or (_expired(j, now) and _not_cancelling(j))),
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
            j
            for j in self._jobs.values()
            if j.status is Q and j.sent_at is None and j.updated_at < now - older_than
            and (j.batch_id is None or j.batch_id in self._sealed)
        ]  # fmt: skip
        return sorted(found, key=lambda j: j.updated_at)[:limit]

    def unsealed(self, older_than: timedelta, limit: int) -> list[UUID]:
        now = self._now()
        latest = {}
        for batch_id in self._batches.keys() - self._sealed:
            queued = [self._jobs[i].updated_at for i in self._batches[batch_id] if self._jobs[i].status is Q]
            if queued and max(queued) < now - older_than:
                latest[batch_id] = max(queued)
        return sorted(latest, key=latest.__getitem__)[:limit]

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
        latest = max(self._received.values(), default=datetime.min.replace(tzinfo=UTC))
        self._received[key] = max(datetime.now(UTC), latest + timedelta(microseconds=1))  # in recording order
        return True

    def _now(self) -> datetime:
        self._fail_if_broken()
        return datetime.now(UTC)


def _not_cancelling(job: Job) -> bool:
    return job.cancel_requested_at is None


def _expired(job: Job, now: datetime) -> bool:
    return job.status is R and job.lease_until is not None and job.lease_until < now


class InMemoryBlobStore:
    """Inputs by blob name; read URLs carry a fake ``se=`` expiry so tests can see they were signed."""

    base_url = "memory://account"

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.failure: Exception | None = None

    def put_input(self, job_id: UUID, data: bytes, sha256: str, *, name: str | None = None) -> str:
        if self.failure is not None:
            raise self.failure
        name = name or f"{job_id}/input.tif"
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

    def ping(self) -> None:
        if self.failure is not None:
            raise self.failure


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


class InMemoryQueueStats:
    """``shared.queue_stats.QueueStats``: the counts of known queues (zeros by default), ``failure`` to break it,
    ``delay`` seconds to make it slow."""

    def __init__(self, counts: dict[str, tuple[int, int, int]] | None = None) -> None:
        self.counts_by_queue = counts or {}
        self.failure: Exception | None = None
        self.delay = 0.0
        self.calls: list[list[str]] = []

    def counts(self, queue_names: Sequence[str]) -> list[QueueCounts]:
        self.calls.append(list(queue_names))
        if self.delay:
            time.sleep(self.delay)
        if self.failure is not None:
            raise self.failure
        found = []
        for name in queue_names:
            active, scheduled, dead_letter = self.counts_by_queue.get(name, (0, 0, 0))
            total = active + scheduled + dead_letter
            found.append(
                QueueCounts(name=name, active=active, scheduled=scheduled, dead_letter=dead_letter, total=total)
            )
        return found


class RecordingOutbox:
    """:class:`shared.events.Outbox` that records the jobs flushed and the stalled deliveries asked for (the outbox
    itself is tested on PostgreSQL)."""

    def __init__(self) -> None:
        self.flushed: list[UUID] = []
        self.resumes: list[tuple[timedelta, int]] = []

    def flush(self, job: Job) -> None:
        self.flushed.append(job.job_id)

    def sweep(self, older_than: timedelta, limit: int) -> int:
        return 0

    def resume(self, older_than: timedelta, limit: int) -> int:
        self.resumes.append((older_than, limit))
        return 0


class InMemoryWorkerRegistry:
    """:class:`shared.workers.WorkerRegistry` in memory: worker id -> (host, device, current job), plus every beat
    (``wait_for(count)`` until that many); ``failure`` makes it raise."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str, UUID | None]] = {}
        self.beats: list[UUID | None] = []
        self.failure: Exception | None = None
        self.beaten = threading.Condition()

    def beat(self, worker_id: str, host: str, device: str, current_job: UUID | None) -> None:
        with self.beaten:
            self.beats.append(current_job)
            self.beaten.notify_all()
        if self.failure is not None:
            raise self.failure
        self.rows[worker_id] = (host, device, current_job)

    def gone(self, worker_id: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.rows.pop(worker_id, None)

    def wait_for(self, count: int, timeout: float = 2.0) -> None:
        """Until ``count`` beats happened; ``timeout`` bounds a hang, it is never a speed claim."""
        with self.beaten:
            assert self.beaten.wait_for(lambda: len(self.beats) >= count, timeout)


class Refusing:
    """A dependency a unit test does not expect to be used: every call fails the test."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        raise AssertionError(f"{self._name}.{attribute} was not expected in this test")


def unit_deps(settings: Settings, **parts: Any) -> Deps:
    """The Function App's dependencies for a unit test: in-memory stores, a recording outbox, and whatever is not
    given refuses to be used."""
    defaults: dict[str, Any] = {
        "jobs": InMemoryJobStore(),
        "blobs": InMemoryBlobStore(),
        "publisher": InMemoryPublisher(),
        "dead_letters": Refusing("dead_letters"),
        "notifier": RecordingOutbox(),
        "webhook_summary": lambda _job_id: None,
        "deliverer": Refusing("deliverer"),
        "stats": Refusing("stats"),
        "queue_stats": Refusing("queue_stats"),
    }
    return Deps(settings=settings, **{**defaults, **parts})
