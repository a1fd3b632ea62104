"""The backend fixtures themselves: a real PostgreSQL database per test, a real Azurite blob service."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from local.postgres import PostgresServer

pytestmark = pytest.mark.integration


def test_database_url_is_a_fresh_empty_database(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        conn.execute("CREATE TABLE t (x int)")
    assert tables == (0,)


def test_database_url_differs_per_test(database_url: str, postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert database_url.rsplit("/", 1)[1] in names
    assert postgres_server.url.rsplit("/", 1)[1] == "postgres"


def test_server_runs_without_durability(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url) as conn:
        row = conn.execute("SHOW fsync").fetchone()
    assert row == ("off",)


def test_azurite_round_trips_a_blob(blob_connection_string: str) -> None:
    container = f"c{uuid.uuid4().hex[:12]}"
    with BlobServiceClient.from_connection_string(blob_connection_string) as client:
        client.create_container(container)
        blob = client.get_blob_client(container, "a/b.bin")
        blob.upload_blob(b"\x00\x01payload")
        assert blob.download_blob().readall() == b"\x00\x01payload"
        with pytest.raises(ResourceNotFoundError):
            client.get_blob_client(container, "missing").download_blob()
