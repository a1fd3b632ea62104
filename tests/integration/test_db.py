"""PostgresJobRepository and the migrations against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from azure.core.credentials import AccessToken
from psycopg_pool import ConnectionPool

from local.postgres import PostgresServer
from shared.db import PostgresJobRepository, open_pool
from shared.errors import DatabaseUnavailable
from shared.jobs import IdempotencyConflict
from shared.migrate import MigrationError, available, migrate
from shared.settings import Settings
from tests.contracts.job_repository import SHA_A, SHA_B, JobRepositoryContract, create

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
def repo(pool: ConnectionPool) -> PostgresJobRepository:
    return PostgresJobRepository(pool)


class TestPostgresJobRepository(JobRepositoryContract):
    pass


def test_migrate_applies_once(database_url: str) -> None:
    assert migrate(database_url) == [m.version for m in available()]
    assert migrate(database_url) == []
    with psycopg.connect(database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {"jobs", "results", "schema_migrations"}


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
        conn.execute("INSERT INTO results (job_id, result) VALUES (%s, '{}')", (uuid.uuid4(),))


def test_the_same_key_submitted_concurrently_makes_one_job(repo: PostgresJobRepository) -> None:
    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(lambda _: create(repo, key="race"), range(16)))
    assert sum(created for _, created in outcomes) == 1
    assert len({job.job_id for job, _ in outcomes}) == 1


def test_conflicting_bytes_under_concurrency(repo: PostgresJobRepository) -> None:
    def attempt(i: int) -> str:
        try:
            create(repo, key="race-2", sha256=SHA_A if i % 2 else SHA_B)
        except IdempotencyConflict:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(attempt, range(16)))
    assert results.count("ok") == 8
    assert results.count("conflict") == 8


def test_concurrent_deliveries_write_one_result(repo: PostgresJobRepository, pool: ConnectionPool) -> None:
    job, _ = create(repo)
    repo.start_attempt(job.job_id)
    with ThreadPoolExecutor(8) as ex:
        wins = list(ex.map(lambda i: repo.succeed(job.job_id, {"delivery": i}), range(8)))
    assert wins.count(True) == 1
    with pool.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM results WHERE job_id = %s", (job.job_id,)).fetchone()
    assert rows == (1,)


def test_a_database_that_is_not_there_is_transient(unused_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{unused_port}/postgres?connect_timeout=2"
    with open_pool(settings_for(url, DB_POOL_TIMEOUT="1", DB_POOL_MIN_SIZE="0")) as pool:
        repo = PostgresJobRepository(pool)
        with pytest.raises(DatabaseUnavailable) as info:
            repo.get(uuid.uuid4())
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
        PostgresJobRepository(pool).get(uuid.uuid4())
    assert credential.scopes
    assert credential.scopes[0] == ("https://ossrdbms-aad.database.windows.net/.default",)
