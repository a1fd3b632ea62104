"""PostgreSQL: the connection pool and :class:`PostgresJobStore`, the job store on it.

Locally the pool connects with ``DATABASE_URL``; in Azure with ``POSTGRES_HOST``/``POSTGRES_USER`` and a Microsoft
Entra token as the password (:mod:`shared.pg_entra`). psycopg_pool evaluates ``kwargs`` for every new connection,
so a connection opened after the token expired gets a fresh one. Driver and pool errors that mean "the database is
not there right now" (down, unreachable, read-only) become :class:`~shared.errors.DatabaseUnavailable` (transient).
"""

from __future__ import annotations

import functools
import math
import select
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import psycopg
from azure.core.credentials import TokenCredential
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from shared.errors import DatabaseUnavailable
from shared.jobs import (
    Callback,
    DeadLetter,
    DeadLetterFilter,
    IdempotencyConflict,
    Job,
    JobFilter,
    NewJob,
    Priority,
    RecordedDeadLetter,
)
from shared.lifecycle import Event, statement
from shared.settings import Settings

# A host that drops packets must not hold a pool slot for the OS's timeouts: connecting gives up after 5 s, and TCP
# keepalives (and tcp_user_timeout) notice a server that vanished mid-call within about 30 s instead of ~15 min.
_CONNECTION: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
# "The database is not there (for writes) right now": down, unreachable, out of connections, or read-only (storage
# full, a failover that landed on a standby), which psycopg classes as an InternalError.
_UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    PoolTimeout,
    TooManyRequests,
)

P = ParamSpec("P")
R = TypeVar("R")

_JOB_COLUMNS = (
    "job_id, status, idempotency_key, input_blob, input_sha256, params, generation, sent_at, attempts, drains,"
    " worker_id, lease_until, started_at, finished_at, error_code, error_message, created_at, updated_at, priority,"
    " batch_id, cancel_requested_at, progress, retries, forgiven, first_started_at, callback_url, callback_events"
)
_JOB = f"""
    SELECT {", ".join("j." + c.strip() for c in _JOB_COLUMNS.split(","))}, r.result
    FROM jobs j LEFT JOIN results r USING (job_id)
"""
# A job just inserted has no result: its row comes back from the INSERT itself, without a second round trip.
_INSERTED = f" RETURNING {_JOB_COLUMNS}, NULL::jsonb AS result"
_INSERT = (
    "INSERT INTO jobs (job_id, input_blob, input_sha256, params, idempotency_key, priority, batch_id, batch_index,"
    " callback_url, callback_events, webhook_secret) VALUES (%(job_id)s, %(input_blob)s, %(input_sha256)s,"
    " %(params)s, %(idempotency_key)s, %(priority)s, %(batch_id)s, %(batch_index)s, %(callback_url)s,"
    " %(callback_events)s, %(webhook_secret)s)"
)


class QuickCheck:
    """A pool's check (a server restart must not hand out dead connections) without a round trip for a connection whose
    last full check (an empty query) was less than ``fresh`` seconds ago: one the server closed since (a restart, a
    crash, a terminated backend) has something to read while idle, its FATAL notice or the end of the stream, and
    gets the full check, as does one last checked longer ago. What it cannot see, a peer gone silently, the
    full check would only see after the TCP timeouts too. The API's and the worker's pools: a round trip less per
    hand-out, two per submit, one per progress write."""

    def __init__(self, fresh: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._fresh, self._clock = fresh, clock
        self._lock = threading.Lock()
        self._checked: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        now = self._clock()
        with self._lock:
            checked = self._checked.get(conn, -math.inf)
        if now - checked < self._fresh and not conn.closed and not _readable(conn):
            return
        ConnectionPool.check_connection(conn)
        with self._lock:
            self._checked[conn] = now


def _readable(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection has input waiting: the server said something (or closed it) unasked. (``poll``,
    not ``select``, which cannot take a descriptor above 1023.)"""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def open_pool(
    settings: Settings,
    credential: TokenCredential | None = None,
    *,
    max_size: int | None = None,
    check: Callable[[psycopg.Connection[Any]], None] = ConnectionPool.check_connection,
) -> ConnectionPool:
    """An open pool (connections are made in the background; a request waits at most ``db_pool_timeout``) of at
    most ``max_size`` connections (default ``db_pool_max_size``), each checked by ``check`` when handed out (default:
    an empty query; :class:`QuickCheck`)."""
    common: dict[str, Any] = {
        "min_size": settings.db_pool_min_size,
        "max_size": max_size or settings.db_pool_max_size,
        "timeout": settings.db_pool_timeout,
        "check": check,  # a server restart must not hand out dead connections
        "name": "crop-ai",
        "open": True,
    }
    if settings.database_url:
        return ConnectionPool(settings.database_url, kwargs=_CONNECTION, **common)
    from azure.identity import DefaultAzureCredential

    from shared.pg_entra import EntraPassword, entra_conninfo_kwargs

    password = EntraPassword(credential or DefaultAzureCredential())
    return ConnectionPool("", kwargs=lambda: {**entra_conninfo_kwargs(settings, password), **_CONNECTION}, **common)


def translated(method: Callable[P, R]) -> Callable[P, R]:
    """``method`` with the driver and pool errors that mean "the database is not there" (down, unreachable, out of
    connections, read-only) raised as :class:`~shared.errors.DatabaseUnavailable` (transient), the original chained.
    For every method that talks to PostgreSQL, here and in the other stores on the pool."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except _UNAVAILABLE as e:
            raise DatabaseUnavailable(f"database unavailable: {type(e).__name__}: {e}"[:1000]) from e

    return wrapper


class PostgresJobStore:
    """:class:`shared.jobs.JobStore` on PostgreSQL (tables from ``shared/migrations``); every status change runs
    :func:`shared.lifecycle.statement` of its event."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    @translated
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
        new = NewJob(
            job_id=job_id,
            input_blob=input_blob,
            input_sha256=input_sha256,
            params=params,
            priority=priority,
            callback=callback,
        )
        with self._conn() as conn:
            inserted = conn.execute(
                _INSERT + " ON CONFLICT (idempotency_key) DO NOTHING" + _INSERTED,
                _row(new, idempotency_key=idempotency_key),
            ).fetchone()
            if inserted is not None:
                return Job.model_validate(inserted), True
            # The key exists (ON CONFLICT waited for a concurrent insert with the same key to commit).
            row = conn.execute(_JOB + " WHERE j.idempotency_key = %s", (idempotency_key,)).fetchone()
        if row is None:  # the conflicting job was deleted in between: nothing left to be idempotent with
            raise DatabaseUnavailable(f"job with idempotency key {idempotency_key!r} vanished; retry")
        existing = Job.model_validate(row)
        if existing.input_sha256 != input_sha256 or existing.params != params:
            raise IdempotencyConflict(existing)
        return existing, False

    @translated
    def get(self, job_id: UUID) -> Job | None:
        with self._conn() as conn:
            row = conn.execute(_JOB + " WHERE j.job_id = %s", (job_id,)).fetchone()
        return Job.model_validate(row) if row else None

    @translated
    def create_batch(self, batch_id: UUID, jobs: list[NewJob], idempotency_key: str | None) -> tuple[list[Job], bool]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            inserted = cur.execute(
                "INSERT INTO batches (batch_id, idempotency_key, size) VALUES (%s, %s, %s)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING batch_id",
                (batch_id, idempotency_key, len(jobs)),
            ).fetchone()
            if inserted is None:  # the key exists: that batch, as it is
                row = cur.execute("SELECT batch_id FROM batches WHERE idempotency_key = %s", (idempotency_key,))
                existing = row.fetchone()
                if existing is None:
                    raise DatabaseUnavailable(f"batch with idempotency key {idempotency_key!r} vanished; retry")
                return _batch_jobs(cur, existing["batch_id"]), False
            cur.executemany(_INSERT, [_row(job, batch_id=batch_id, batch_index=i) for i, job in enumerate(jobs)])
            return _batch_jobs(cur, batch_id), True  # in the order given

    @translated
    def seal_batch(self, batch_id: UUID, stored: Collection[UUID]) -> bool:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            # The batch's row lock serialises the seal with abort_batch; each statement after it has a new snapshot
            # (READ COMMITTED), so the jobs an abort that held the lock failed are seen.
            batch = cur.execute("SELECT sealed_at FROM batches WHERE batch_id = %s FOR UPDATE", (batch_id,)).fetchone()
            if batch is None or batch["sealed_at"] is not None:
                return batch is not None
            blocked = cur.execute(
                "SELECT 1 FROM jobs WHERE batch_id = %s AND ((status = 'failed' AND error_code = 'enqueue_failed')"
                " OR (status = 'queued' AND job_id <> ALL(%s))) LIMIT 1",
                (batch_id, list(stored)),
            ).fetchone()
            if blocked is not None:
                return False
            cur.execute("UPDATE batches SET sealed_at = now() WHERE batch_id = %s", (batch_id,))
            return True

    @translated
    def abort_batch(self, batch_id: UUID, message: str, older_than: timedelta | None = None) -> list[Job]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            unsealed = "SELECT 1 FROM batches WHERE batch_id = %s AND sealed_at IS NULL FOR UPDATE"
            if cur.execute(unsealed, (batch_id,)).fetchone() is None:  # sealed (now or before): it goes ahead
                return []
            queued = cur.execute(
                "SELECT job_id, generation, updated_at >= now() - %s AS recent FROM jobs"
                " WHERE batch_id = %s AND status = 'queued' ORDER BY batch_index",
                (older_than or timedelta(0), batch_id),
            ).fetchall()
            if older_than is not None and any(row["recent"] for row in queued):
                return []
            params = {"code": "enqueue_failed", "message": message}
            aborted = [cur.execute(statement(Event.ABORT_SUBMIT, _JOB_COLUMNS), {**params, **row}).fetchone()
                       for row in queued]  # fmt: skip
            return [Job.model_validate(row) for row in aborted if row is not None]

    @translated
    def batch_jobs(self, batch_id: UUID) -> list[Job] | None:
        with self._conn() as conn:
            if conn.execute("SELECT 1 FROM batches WHERE batch_id = %s", (batch_id,)).fetchone() is None:
                return None
            return _batch_jobs(conn, batch_id)

    @translated
    def webhook_secret(self, job_id: UUID) -> str | None:
        with self._conn() as conn:
            row = conn.execute("SELECT webhook_secret FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        return row["webhook_secret"] if row else None

    @translated
    def find(self, where: JobFilter, limit: int) -> list[Job]:
        conditions, params = ["TRUE"], []
        for sql, value in (
            ("j.status = %s", where.status.value if where.status else None),
            ("j.params->>'analysis' = %s", where.analysis),
            ("j.created_at > %s", where.created_after),
            ("j.created_at < %s", where.created_before),
            ("j.batch_id = %s", where.batch_id),
        ):
            if value is not None:
                conditions.append(sql)
                params.append(value)
        if where.after is not None:
            conditions.append("(j.created_at, j.job_id) < (%s, %s)")
            params.extend(where.after)
        return self._select(
            " AND ".join(conditions) + " ORDER BY j.created_at DESC, j.job_id DESC LIMIT %s", (*params, limit)
        )

    @translated
    def backlog(self) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT count(*) AS n FROM jobs WHERE status = 'queued'").fetchone()
        return int(row["n"]) if row else 0

    @translated
    def find_by_key(self, idempotency_key: str) -> Job | None:
        found = self._select("j.idempotency_key = %s", (idempotency_key,))
        return found[0] if found else None

    @translated
    def batch_by_key(self, idempotency_key: str) -> UUID | None:
        with self._conn() as conn:
            row = conn.execute("SELECT batch_id FROM batches WHERE idempotency_key = %s", (idempotency_key,)).fetchone()
        return row["batch_id"] if row else None

    @translated
    def dead_letter_log(self, where: DeadLetterFilter, limit: int) -> list[RecordedDeadLetter]:
        conditions, params = ["TRUE"], []
        for sql, value in (
            ("d.reason = %s", where.reason),
            ("d.action = %s", where.action),
            ("j.status = %s", where.job_status.value if where.job_status else None),
        ):
            if value is not None:
                conditions.append(sql)
                params.append(value)
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT d.*, j.status AS job_status FROM dead_letters d LEFT JOIN jobs j ON j.job_id = d.job_id"
                f" WHERE {' AND '.join(conditions)}"
                " ORDER BY d.received_at DESC, d.message_id, d.sequence_number DESC LIMIT %s",
                (*params, limit),
            ).fetchall()
        return [RecordedDeadLetter.model_validate(row) for row in rows]

    @translated
    def ping(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT 1")

    # Events: each one conditional UPDATE from shared.lifecycle

    @translated
    def _move(self, event: Event, job_id: UUID, **params: Any) -> Job | None:
        with self._conn() as conn:
            moved = conn.execute(statement(event, _JOB_COLUMNS), {"job_id": job_id, **params}).fetchone()
            return None if moved is None else Job.model_validate(moved)

    def confirm_sent(self, job_id: UUID, generation: int) -> Job | None:
        return self._move(Event.CONFIRM_SENT, job_id, generation=generation)

    def abort_submit(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None:
        return self._move(Event.ABORT_SUBMIT, job_id, generation=generation, code=code, message=message)

    def resubmit(self, job_id: UUID) -> Job | None:
        return self._move(Event.RESUBMIT, job_id)

    def claim(self, job_id: UUID, *, worker_id: str, lease: timedelta, max_attempts: int) -> Job | None:
        return self._move(Event.CLAIM, job_id, worker_id=worker_id, lease=lease, max_attempts=max_attempts)

    def renew_lease(self, job_id: UUID, attempt: int, lease: timedelta) -> Job | None:
        return self._move(Event.RENEW_LEASE, job_id, attempt=attempt, lease=lease)

    def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> Job | None:
        return self._move(Event.SUCCEED, job_id, attempt=attempt, result=Jsonb(result))

    def fail(self, job_id: UUID, attempt: int, code: str, message: str) -> Job | None:
        return self._move(Event.FAIL, job_id, attempt=attempt, code=code, message=message)

    def release(self, job_id: UUID, attempt: int, *, drain: bool = False) -> Job | None:
        return self._move(Event.RELEASE, job_id, attempt=attempt, drain=int(drain))

    def progress(self, job_id: UUID, attempt: int, progress: dict[str, Any], *, notify: bool = False) -> Job | None:
        return self._move(Event.PROGRESS, job_id, attempt=attempt, progress=Jsonb(progress), notify=notify)

    def stop(self, job_id: UUID, attempt: int) -> Job | None:
        return self._move(Event.STOP, job_id, attempt=attempt)

    def cancel(self, job_id: UUID) -> Job | None:
        return self._move(Event.CANCEL, job_id)

    def request_cancel(self, job_id: UUID) -> Job | None:
        return self._move(Event.REQUEST_CANCEL, job_id)

    def retry(self, job_id: UUID) -> Job | None:
        return self._move(Event.RETRY, job_id)

    def resend(self, job_id: UUID, generation: int, older_than: timedelta) -> Job | None:
        return self._move(Event.RESEND, job_id, generation=generation, older_than=older_than)

    def expire(self, job_id: UUID, max_attempts: int) -> Job | None:
        return self._move(Event.EXPIRE, job_id, max_attempts=max_attempts)

    def exhaust(self, job_id: UUID, max_attempts: int, message: str) -> Job | None:
        return self._move(Event.EXHAUST, job_id, max_attempts=max_attempts, message=message)

    def redrive(self, job_id: UUID, generation: int) -> Job | None:
        return self._move(Event.REDRIVE, job_id, generation=generation)

    def dead_lettered(self, job_id: UUID, generation: int, code: str, message: str) -> Job | None:
        return self._move(Event.DEAD_LETTERED, job_id, generation=generation, code=code, message=message)

    def cancel_expired(self, job_id: UUID) -> Job | None:
        return self._move(Event.CANCEL_EXPIRED, job_id)

    # Reconciler queries

    @translated
    def unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        return self._select(
            "j.status = 'queued' AND j.sent_at IS NULL AND j.updated_at < now() - %s AND (j.batch_id IS NULL OR"
            " EXISTS (SELECT 1 FROM batches b WHERE b.batch_id = j.batch_id AND b.sealed_at IS NOT NULL))"
            " ORDER BY j.updated_at LIMIT %s",
            (older_than, limit),
        )

    @translated
    def unsealed(self, older_than: timedelta, limit: int) -> list[UUID]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT b.batch_id FROM batches b JOIN jobs j ON j.batch_id = b.batch_id AND j.status = 'queued'"
                " WHERE b.sealed_at IS NULL GROUP BY b.batch_id HAVING max(j.updated_at) < now() - %s"
                " ORDER BY max(j.updated_at) LIMIT %s",
                (older_than, limit),
            ).fetchall()
        return [row["batch_id"] for row in rows]

    @translated
    def expired(self, limit: int) -> list[Job]:
        return self._select("j.status = 'running' AND j.lease_until < now() ORDER BY j.lease_until LIMIT %s", (limit,))

    @translated
    def stranded(self, max_attempts: int, limit: int) -> list[Job]:
        return self._select(
            "j.status = 'queued' AND j.attempts - j.drains - j.forgiven >= %s ORDER BY j.created_at LIMIT %s",
            (max_attempts, limit),
        )

    @translated
    def record_dead_letter(self, letter: DeadLetter) -> bool:
        """Keep a dead letter the reconciler drained; ``False`` if it was recorded before (a redelivery)."""
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO dead_letters (message_id, sequence_number, job_id, generation, reason, description,"
                " delivery_count, enqueued_at, action) VALUES (%(message_id)s, %(sequence_number)s, %(job_id)s,"
                " %(generation)s, %(reason)s, %(description)s, %(delivery_count)s, %(enqueued_at)s, %(action)s)"
                " ON CONFLICT DO NOTHING RETURNING message_id",
                letter.model_dump(),
            ).fetchone()
        return row is not None

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute(_JOB + " WHERE " + where, params).fetchall()
        return [Job.model_validate(row) for row in rows]


def _row(
    job: NewJob, *, idempotency_key: str | None = None, batch_id: UUID | None = None, batch_index: int | None = None
) -> dict[str, Any]:
    callback = job.callback
    return {
        "job_id": job.job_id,
        "input_blob": job.input_blob,
        "input_sha256": job.input_sha256,
        "params": Jsonb(job.params),
        "idempotency_key": idempotency_key,
        "priority": job.priority,
        "batch_id": batch_id,
        "batch_index": batch_index,
        "callback_url": callback.url if callback else None,
        "callback_events": callback.events if callback else None,
        "webhook_secret": callback.secret if callback else None,
    }


def _batch_jobs(conn: psycopg.Cursor[dict[str, Any]], batch_id: UUID) -> list[Job]:
    rows = conn.execute(_JOB + " WHERE j.batch_id = %s ORDER BY j.batch_index, j.job_id", (batch_id,)).fetchall()
    return [Job.model_validate(row) for row in rows]
