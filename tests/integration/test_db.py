"""PostgresJobStore and the migrations against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from azure.core.credentials import AccessToken
from psycopg import sql
from psycopg_pool import ConnectionPool

from gpu_worker.app import pool_size
from local.postgres import PostgresServer
from shared.db import PostgresJobStore, QuickCheck, open_pool
from shared.errors import DatabaseUnavailable
from shared.jobs import IdempotencyConflict, JobStatus
from shared.migrate import MigrationError, available, migrate
from shared.settings import Settings
from tests.contracts.job_store import SHA_A, SHA_B, JobStoreContract, claimed, create

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def settings_for(database_url: str, **extra: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "ServiceBusConnection": "unused", "AzureWebJobsStorage": "unused", **extra}
    )


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    migrate(database_url)
    with open_pool(settings_for(database_url, DB_POOL_MAX_SIZE="8")) as pool:
        yield pool


@pytest.fixture
def store(pool: ConnectionPool) -> PostgresJobStore:
    return PostgresJobStore(pool)


class TestPostgresJobStore(JobStoreContract):
    pass


def test_migrate_applies_once(database_url: str) -> None:
    assert migrate(database_url) == [m.version for m in available()]
    assert migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {"jobs", "results", "dead_letters", "job_events", "batches", "workers", "schema_migrations"}


def test_concurrent_migrations_apply_each_version_once(database_url: str) -> None:
    with ThreadPoolExecutor(4) as ex:
        runs = list(ex.map(lambda _: migrate(database_url), range(4)))
    assert sorted(runs) == [[], [], [], [m.version for m in available()]]


def test_a_changed_migration_is_refused(database_url: str) -> None:
    migrate(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE schema_migrations SET sha256 = 'edited' WHERE version = '0001'")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(database_url)


def test_migrate_command(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shared.migrate", "--database-url", database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "applied: 0001" in done.stdout


def test_migrate_through_a_pool(pool: ConnectionPool) -> None:
    assert migrate(pool) == []  # the fixture migrated already


def test_the_schema_refuses_a_result_for_an_unknown_job(pool: ConnectionPool) -> None:
    with pool.connection() as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO results (job_id, attempt, result) VALUES (%s, 1, '{}')", (uuid.uuid4(),))


def test_the_same_key_submitted_concurrently_makes_one_job(store: PostgresJobStore) -> None:
    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(lambda _: create(store, key="race"), range(16)))
    assert sum(created for _, created in outcomes) == 1
    assert len({job.job_id for job, _ in outcomes}) == 1


def test_conflicting_bytes_under_concurrency(store: PostgresJobStore) -> None:
    def attempt(i: int) -> str:
        try:
            create(store, key="race-2", sha256=SHA_A if i % 2 else SHA_B)
        except IdempotencyConflict:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(attempt, range(16)))
    assert results.count("ok") == 8
    assert results.count("conflict") == 8


def test_concurrent_succeeds_write_one_result_naming_the_attempt(store: PostgresJobStore, pool: ConnectionPool) -> None:
    job = claimed(store, create(store)[0])
    with ThreadPoolExecutor(8) as ex:
        wins = list(ex.map(lambda i: store.succeed(job.job_id, job.attempts, {"delivery": i}), range(8)))
    assert sum(w is not None for w in wins) == 1
    with pool.connection() as conn:
        rows = conn.execute("SELECT count(*), min(attempt) FROM results WHERE job_id = %s", (job.job_id,)).fetchone()
    assert rows == (1, job.attempts)


def test_the_schema_keeps_a_lease_on_running_jobs_only(store: PostgresJobStore, pool: ConnectionPool) -> None:
    job = create(store)[0]
    with pool.connection() as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = %s", (job.job_id,))


def test_migration_0003_moves_existing_rows_to_the_lifecycle(database_url: str) -> None:
    """Rows written by the previous schema (0001 + 0002) come out in the new model."""
    old = [m for m in available() if m.version < "0003"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for m in old:
            conn.execute(m.sql.encode())
        conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in old:
            conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (m.version, m.name, m.sha256))
        ids = {s: uuid.uuid4() for s in ("queued_unsent", "queued_sent", "processing", "succeeded", "enqueue_failed")}
        for state, job_id in ids.items():
            status = {"queued_unsent": "queued", "queued_sent": "queued", "enqueue_failed": "failed"}.get(state, state)
            conn.execute(
                "INSERT INTO jobs (job_id, status, input_blob, input_sha256, params, attempts, error_code, enqueued_at)"
                " VALUES (%s, %s, 'b', %s, '{}', %s, %s, CASE WHEN %s THEN now() END)",
                (job_id, status, SHA_A, 1 if state in ("processing", "succeeded") else 0,
                 "enqueue_failed" if state == "enqueue_failed" else None, state != "queued_unsent"),
            )  # fmt: skip
        conn.execute("INSERT INTO results (job_id, result) VALUES (%s, '{}')", (ids["succeeded"],))
    assert migrate(database_url) == [m.version for m in available() if m.version >= "0003"]
    with open_pool(settings_for(database_url)) as pool:
        store = PostgresJobStore(pool)
        jobs = {state: store.get(job_id) for state, job_id in ids.items()}
        assert all(jobs.values())
        unsent, sent, running = jobs["queued_unsent"], jobs["queued_sent"], jobs["processing"]
        assert unsent is not None
        assert sent is not None
        assert running is not None
        assert (unsent.status, unsent.sent_at, unsent.generation) == (JobStatus.QUEUED, None, 1)
        assert sent.sent_at is not None
        assert running.status is JobStatus.RUNNING
        assert [j.job_id for j in store.expired(10)] == [running.job_id]  # the reconciler takes it over
        assert store.claim(running.job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=5) is not None
        with pool.connection() as conn:
            assert conn.execute("SELECT attempt FROM results").fetchall() == [(1,)]


def test_a_database_that_is_not_there_is_transient(unused_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{unused_port}/postgres?connect_timeout=2"
    with open_pool(settings_for(url, DB_POOL_TIMEOUT="1", DB_POOL_MIN_SIZE="0")) as pool:
        store = PostgresJobStore(pool)
        with pytest.raises(DatabaseUnavailable) as info:
            store.get(uuid.uuid4())
    assert info.value.transient


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class CountingCredential:
    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("entra-token", int(time.time()) + 3600)


def test_entra_settings_fetch_a_token_for_each_new_connection(postgres_server: PostgresServer) -> None:
    # The throwaway server has no TLS, so the sslmode=require connection is refused after the token was fetched:
    # what this checks is the wiring (host/user settings -> EntraPassword -> the pool's per-connection kwargs).
    url = urlsplit(postgres_server.url)
    settings = Settings.from_env(
        {"POSTGRES_HOST": url.hostname or "", "POSTGRES_PORT": str(url.port), "POSTGRES_USER": "postgres",
         "POSTGRES_DATABASE": "postgres", "DB_POOL_MIN_SIZE": "0", "DB_POOL_TIMEOUT": "2",
         "ServiceBusConnection": "unused", "AzureWebJobsStorage": "unused"}
    )  # fmt: skip
    credential = CountingCredential()
    with open_pool(settings, credential) as pool, pytest.raises(DatabaseUnavailable):
        PostgresJobStore(pool).get(uuid.uuid4())
    assert credential.scopes
    assert credential.scopes[0] == ("https://ossrdbms-aad.database.windows.net/.default",)


def test_a_read_only_server_is_database_unavailable(database_url: str, pool: ConnectionPool) -> None:
    """Azure PG Flexible Server turns read-only when its storage is ~95 % full; a failover can land on a standby
    briefly. Every UPDATE then fails with SQLSTATE 25006 (psycopg classes it InternalError): an outage, transient."""
    store = PostgresJobStore(pool)
    job_id = create(store)[0].job_id
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(name)))
    with open_pool(settings_for(database_url)) as read_only_pool, pytest.raises(DatabaseUnavailable):
        PostgresJobStore(read_only_pool).claim(job_id, worker_id="w", lease=timedelta(minutes=2), max_attempts=5)


def test_succeed_reports_the_move_it_made_over_a_result_row_from_before_0003(pool: ConnectionPool) -> None:
    """A results row left from before 0003 (a 'processing' job that had stored one) is replaced: the move and its
    report agree (the UPDATE in the CTE commits even when its INSERT inserts nothing)."""
    store = PostgresJobStore(pool)
    job_id = create(store)[0].job_id
    claimed = store.claim(job_id, worker_id="w", lease=timedelta(minutes=2), max_attempts=5)
    assert claimed is not None
    with pool.connection() as conn:
        conn.execute("INSERT INTO results (job_id, attempt, result) VALUES (%s, 0, '{}')", (job_id,))
    moved = store.succeed(job_id, claimed.attempts, {"attempt": claimed.attempts})
    now = store.get(job_id)
    assert now is not None
    assert (moved is None) == (now.status is not JobStatus.SUCCEEDED), (
        f"succeed returned {moved!r} but the job is {now.status.value} with the result {now.result}"
    )


@pytest.mark.parametrize(("in_flight", "max_size"), [("1", 4), ("2", 6), ("4", 10)])
def test_the_workers_pool_has_a_connection_for_each_thread_that_may_use_one(
    database_url: str, in_flight: str, max_size: int
) -> None:
    """Per job in flight its stage's thread and its attempt's guard, plus the registry and a notifier's flush; at
    least DB_POOL_MAX_SIZE (4)."""
    settings = settings_for(database_url, WORKER_JOBS_IN_FLIGHT=in_flight)
    with open_pool(settings, max_size=pool_size(settings)) as pool:
        assert pool.max_size == max_size
        held = [pool.getconn() for _ in range(max_size)]  # all at once: none waits DB_POOL_TIMEOUT
        for conn in held:
            pool.putconn(conn)


class CountingCheck(QuickCheck):
    """A QuickCheck that counts the empty queries it sends (the full check)."""

    def __init__(self, fresh: float) -> None:
        super().__init__(fresh)
        self.full = 0

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        with _count_empty_queries(self, conn):
            super().__call__(conn)


@contextmanager
def _count_empty_queries(check: CountingCheck, conn: psycopg.Connection[Any]) -> Iterator[None]:
    execute = conn.execute

    def counted(query: Any, *args: Any, **kwargs: Any) -> Any:
        check.full += query == ""
        return execute(query, *args, **kwargs)

    conn.execute = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        del conn.execute


def test_the_quick_check_skips_the_round_trip_only_for_a_fresh_idle_connection(database_url: str) -> None:
    check = CountingCheck(fresh=60.0)
    settings = settings_for(database_url, DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="1")
    with open_pool(settings, check=check) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        assert check.full == 1  # the first hand-out only: the connection was then fresh and had nothing to read
        with pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)  # the FATAL notice and the end of the stream arrive
        with pool.connection() as conn:  # the dead connection failed its full check; a new one is handed out
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != pid
        assert check.full >= 2


def test_the_quick_check_checks_a_connection_idle_for_longer_than_fresh(database_url: str) -> None:
    check = CountingCheck(fresh=0.0)
    with open_pool(settings_for(database_url, DB_POOL_MAX_SIZE="1"), check=check) as pool:
        for _ in range(3):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
    assert check.full == 3
