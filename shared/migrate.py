"""Versioned SQL migrations: ``python -m shared.migrate`` (or :func:`migrate` from tests and the stack runner).

Files ``shared/migrations/NNNN_name.sql`` are applied in order, each once, recorded in ``schema_migrations`` with
its SHA-256. The whole run is one transaction holding an advisory lock, so concurrent runs (two instances starting
at once) apply each migration exactly once, and a failed migration leaves nothing behind. A recorded migration
whose file has changed since is an error: write a new migration instead.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

LOCK_ID = 0x63726F70  # "crop": the advisory lock every migration run takes


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    files = [f for f in resources.files("shared.migrations").iterdir() if f.name.endswith(".sql")]
    migrations = []
    for f in sorted(files, key=lambda f: f.name):
        version, _, rest = f.name.partition("_")
        if not version.isdigit():
            raise MigrationError(f"migration file {f.name} does not start with a version number")
        migrations.append(Migration(version=version, name=rest.removesuffix(".sql"), sql=f.read_text()))
    return migrations


def migrate(target: str | ConnectionPool) -> list[str]:
    """Apply pending migrations to a database (a conninfo/URL or a pool); return the versions applied."""
    if isinstance(target, ConnectionPool):
        with target.connection() as conn:
            return _migrate(conn)
    with psycopg.connect(target, autocommit=True) as conn:
        return _migrate(conn)


def _migrate(conn: psycopg.Connection[Any]) -> list[str]:
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = conn.execute("SELECT version, sha256 FROM schema_migrations").fetchall()
        done: dict[str, str] = {row[0]: row[1] for row in rows}
        for m in available():
            if m.version in done:
                if done[m.version] != m.sha256:
                    raise MigrationError(f"migration {m.version}_{m.name} changed after it was applied")
                continue
            log.info("applying migration %s_%s", m.version, m.name, extra={"action": "migrate"})
            conn.execute(m.sql.encode())  # no parameters: several statements may share one query
            conn.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (m.version, m.name, m.sha256),
            )
            applied_now.append(m.version)
    return applied_now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="connect here instead of using the app settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.database_url:
        applied = migrate(args.database_url)
    else:
        from shared.db import open_pool
        from shared.settings import Settings

        with open_pool(Settings.from_env()) as pool:
            applied = migrate(pool)
    print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
