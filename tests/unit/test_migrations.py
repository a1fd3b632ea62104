from __future__ import annotations

from shared.migrate import available


def test_migrations_are_numbered_in_order_and_unique() -> None:
    migrations = available()
    versions = [m.version for m in migrations]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    assert versions[0] == "0001"
    assert all(len(m.sha256) == 64 and m.sql.strip() for m in migrations)


def test_first_migration_creates_jobs_and_results() -> None:
    sql = available()[0].sql
    assert "CREATE TABLE jobs" in sql
    assert "CREATE TABLE results" in sql
    assert "REFERENCES jobs" in sql
