"""PostgreSQL: the connection pool and :class:`PostgresJobRepository`, the job repository on it.

Locally the pool connects with ``DATABASE_URL``; in Azure with ``POSTGRES_HOST``/``POSTGRES_USER`` and a Microsoft
Entra token as the password (:mod:`shared.pg_entra`). psycopg_pool evaluates ``kwargs`` for every new connection,
so a connection opened after the token expired gets a fresh one. Driver and pool errors that mean "the database is
not there right now" become :class:`~shared.errors.DatabaseUnavailable` (transient).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
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
from shared.jobs import IdempotencyConflict, Job
from shared.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

_JOB = """
    SELECT j.job_id, j.status, j.idempotency_key, j.input_blob, j.input_sha256, j.params, j.attempts,
           j.error_code, j.error_message, j.created_at, j.updated_at, j.enqueued_at, r.result
    FROM jobs j LEFT JOIN results r USING (job_id)
"""
_ACTIVE = "status IN ('queued', 'processing')"
# A delivered message proves that a send reported as failed reached the broker after all: the job was never run.
_STARTABLE = f"({_ACTIVE} OR (status = 'failed' AND error_code = 'enqueue_failed'))"


def open_pool(settings: Settings, credential: TokenCredential | None = None) -> ConnectionPool:
    """An open pool (connections are made in the background; a request waits at most ``db_pool_timeout``)."""
    common: dict[str, Any] = {
        "min_size": settings.db_pool_min_size,
        "max_size": settings.db_pool_max_size,
        "timeout": settings.db_pool_timeout,
        "check": ConnectionPool.check_connection,  # a server restart must not hand out dead connections
        "name": "crop-ai",
        "open": True,
    }
    if settings.database_url:
        return ConnectionPool(settings.database_url, kwargs={"autocommit": True}, **common)
    from azure.identity import DefaultAzureCredential

    from shared.pg_entra import EntraPassword, entra_conninfo_kwargs

    password = EntraPassword(credential or DefaultAzureCredential())
    return ConnectionPool(
        "", kwargs=lambda: {**entra_conninfo_kwargs(settings, password), "autocommit": True}, **common
    )


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (psycopg.OperationalError, PoolTimeout, TooManyRequests) as e:
            raise DatabaseUnavailable(f"database unavailable: {type(e).__name__}: {e}"[:1000]) from e

    return wrapper


class PostgresJobRepository:
    """:class:`shared.jobs.JobRepository` on PostgreSQL (tables from ``shared/migrations``)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    @_translated
    def create(
        self,
        *,
        job_id: UUID,
        input_blob: str,
        input_sha256: str,
        params: dict[str, Any],
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        with self._conn() as conn:
            inserted = conn.execute(
                "INSERT INTO jobs (job_id, input_blob, input_sha256, params, idempotency_key)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (idempotency_key) DO NOTHING RETURNING job_id",
                (job_id, input_blob, input_sha256, Jsonb(params), idempotency_key),
            ).fetchone()
            if inserted is not None:
                return self._get(conn, job_id), True
            # The key exists (ON CONFLICT waited for a concurrent insert with the same key to commit).
            row = conn.execute(_JOB + " WHERE j.idempotency_key = %s", (idempotency_key,)).fetchone()
        if row is None:  # the conflicting job was deleted in between: nothing left to be idempotent with
            raise DatabaseUnavailable(f"job with idempotency key {idempotency_key!r} vanished; retry")
        existing = _job(row)
        if existing.input_sha256 != input_sha256:
            raise IdempotencyConflict(existing)
        return existing, False

    @_translated
    def get(self, job_id: UUID) -> Job | None:
        with self._conn() as conn:
            row = conn.execute(_JOB + " WHERE j.job_id = %s", (job_id,)).fetchone()
        return _job(row) if row else None

    @_translated
    def start_attempt(self, job_id: UUID) -> Job | None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'processing', attempts = attempts + 1, error_code = NULL,"
                f" error_message = NULL, updated_at = now() WHERE job_id = %s AND {_STARTABLE}",
                (job_id,),
            )
            row = conn.execute(_JOB + " WHERE j.job_id = %s", (job_id,)).fetchone()
        return _job(row) if row else None

    @_translated
    def succeed(self, job_id: UUID, result: dict[str, Any]) -> bool:
        # One statement, so one transaction: the job turns succeeded and its one result row appears together. The
        # UPDATE's row lock serialises two concurrent deliveries; the second finds the job terminal and writes nothing.
        with self._conn() as conn:
            row = conn.execute(
                "WITH done AS ("
                " UPDATE jobs SET status = 'succeeded', error_code = NULL, error_message = NULL, updated_at = now()"
                f" WHERE job_id = %s AND {_ACTIVE} RETURNING job_id)"
                " INSERT INTO results (job_id, result) SELECT job_id, %s FROM done"
                " ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
                (job_id, Jsonb(result)),
            ).fetchone()
        return row is not None

    @_translated
    def fail(self, job_id: UUID, code: str, message: str) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'failed', error_code = %s, error_message = %s, updated_at = now()"
                f" WHERE job_id = %s AND {_ACTIVE}",
                (code, message, job_id),
            )
            return cur.rowcount == 1

    @_translated
    def requeue_enqueue_failed(self, job_id: UUID) -> Job | None:
        # Conditional on the state, so of two concurrent retries exactly one gets the job back.
        with self._conn() as conn:
            changed = conn.execute(
                "UPDATE jobs SET status = 'queued', error_code = NULL, error_message = NULL, enqueued_at = NULL,"
                " updated_at = now()"
                " WHERE job_id = %s AND status = 'failed' AND error_code = 'enqueue_failed' RETURNING job_id",
                (job_id,),
            ).fetchone()
            return self._get(conn, job_id) if changed is not None else None

    @_translated
    def mark_enqueued(self, job_id: UUID) -> bool:
        with self._conn() as conn:
            return conn.execute("UPDATE jobs SET enqueued_at = now() WHERE job_id = %s", (job_id,)).rowcount == 1

    @_translated
    def stale_unsent(self, older_than: timedelta, limit: int) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute(
                _JOB + " WHERE j.status = 'queued' AND j.enqueued_at IS NULL AND j.created_at < now() - %s"
                " ORDER BY j.created_at LIMIT %s",
                (older_than, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def _get(self, conn: psycopg.Cursor[dict[str, Any]], job_id: UUID) -> Job:
        row = conn.execute(_JOB + " WHERE j.job_id = %s", (job_id,)).fetchone()
        assert row is not None, "a job just inserted must be there"
        return _job(row)


def _job(row: dict[str, Any]) -> Job:
    return Job.model_validate(row)
