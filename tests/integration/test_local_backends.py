"""The backend fixtures themselves: a real PostgreSQL database per test, a real Azurite blob service."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient

from local.azurite import AzuriteError, start_azurite, stop_azurite
from local.ports import PortBusy
from local.postgres import PostgresServer
from tests.fixtures.backends import unavailable

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


def test_azurite_binds_its_own_port_and_reports_it_from_a_log_that_names_an_earlier_one(tmp_path: Path) -> None:
    log = tmp_path / "azurite.log"
    log.write_bytes(b"Azurite Blob service successfully listens on http://127.0.0.1:1\n")  # an earlier run's line
    try:
        first = start_azurite(tmp_path / "a", log_path=log)
    except AzuriteError as e:
        unavailable(f"Azurite could not be started: {e}")
        raise  # unreachable: unavailable() skips or fails
    try:
        second = start_azurite(tmp_path / "b", log_path=tmp_path / "b.log")
        try:
            assert first.port not in (1, second.port)
            for azurite in (first, second):
                assert f"127.0.0.1:{azurite.port}/" in azurite.connection_string
                with BlobServiceClient.from_connection_string(azurite.connection_string) as client:
                    assert client.get_service_properties() is not None
            with pytest.raises(PortBusy):
                start_azurite(tmp_path / "c", port=first.port, log_path=tmp_path / "c.log")
        finally:
            stop_azurite(second.process)
    finally:
        stop_azurite(first.process)
