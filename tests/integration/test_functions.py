"""The Functions with real backends: PostgreSQL, Azurite and the Service Bus emulator, dependencies built from the
environment on the first request exactly as in the Function App."""

from __future__ import annotations

import gc
import hashlib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from azure.servicebus import ServiceBusClient
from azure.storage.blob import BlobServiceClient
from psycopg_pool import ConnectionPool

from functions import deps
from functions.deps import Deps
from shared.bus import JobPublisher
from shared.db import PostgresJobRepository
from shared.messages import decode
from shared.migrate import migrate
from shared.storage import BlobStore
from shared.submission import input_blob_name, resend
from tests import geotiffs
from tests.fixtures.servicebus import EmulatorHandle
from tests.functions_client import body, get_job, post_job

pytestmark = pytest.mark.integration


@pytest.fixture
def app_deps(
    monkeypatch: pytest.MonkeyPatch, database_url: str, blob_connection_string: str, servicebus_emulator: EmulatorHandle
) -> Iterator[Deps]:
    migrate(database_url)
    suffix = uuid.uuid4().hex[:10]
    env = {
        "DATABASE_URL": database_url,
        "AzureWebJobsStorage": blob_connection_string,
        "ServiceBusConnection": servicebus_emulator.connection_string,
        "IMAGES_CONTAINER": f"images{suffix}",
        "RESULTS_CONTAINER": f"results{suffix}",
        "RETRY_AFTER_SECONDS": "2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with BlobServiceClient.from_connection_string(blob_connection_string) as client:
        client.create_container(env["IMAGES_CONTAINER"])
        client.create_container(env["RESULTS_CONTAINER"])
    deps.use(None)
    built = deps.get()  # what the first request does
    yield built
    deps.use(None)
    assert isinstance(built.repo, PostgresJobRepository)
    built.repo._pool.close()
    assert isinstance(built.blobs, BlobStore)
    built.blobs.close()
    assert isinstance(built.publisher, JobPublisher)
    built.publisher.close()


def queued_messages(emulator: EmulatorHandle) -> list[bytes]:
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        client.get_queue_receiver(emulator.queue_name) as receiver,
    ):
        return [b"".join(m.body) for m in receiver.peek_messages(max_message_count=50)]


def test_submit_stores_records_and_queues(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    data = geotiffs.real()
    response = post_job(data, headers={"Idempotency-Key": "it-1"})
    assert response.status_code == 202
    job_id = uuid.UUID(body(response)["job_id"])
    assert response.headers["Location"] == f"/api/jobs/{job_id}"
    assert response.headers["Retry-After"] == "2"

    assert isinstance(app_deps.blobs, BlobStore)
    assert app_deps.blobs.input_sha256(f"{job_id}/input.tif") == hashlib.sha256(data).hexdigest()
    assert app_deps.settings.database_url is not None
    with psycopg.connect(app_deps.settings.database_url) as conn:
        row = conn.execute("SELECT status, idempotency_key FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert row == ("queued", "it-1")
    [message] = [decode(m) for m in queued_messages(servicebus_emulator)]
    assert message.job_id == job_id
    assert message.bands[3] == "B04"

    replay = post_job(data, headers={"Idempotency-Key": "it-1"})
    assert replay.status_code == 200
    assert body(replay)["job_id"] == str(job_id)
    assert len(queued_messages(servicebus_emulator)) == 1  # the re-send was dropped as a duplicate
    assert post_job(geotiffs.real(geotiffs.RGBN), headers={"Idempotency-Key": "it-1"}).status_code == 409


def test_status_through_the_job_lifecycle(app_deps: Deps, tmp_path: Path) -> None:
    job_id = uuid.UUID(body(post_job(geotiffs.real()))["job_id"])
    queued = get_job(str(job_id))
    assert body(queued)["status"] == "queued"
    assert queued.headers["Retry-After"] == "2"

    # What the worker does, through the same adapters.
    assert isinstance(app_deps.blobs, BlobStore)
    png = tmp_path / "quicklook.png"
    png.write_bytes(b"\x89PNG quicklook")
    url = app_deps.blobs.put_result(job_id, "quicklook.png", png, "image/png")
    app_deps.repo.start_attempt(job_id)
    assert body(get_job(str(job_id)))["status"] == "processing"
    app_deps.repo.succeed(job_id, {"analysis": "crop-health", "outputs": {"quicklook_png": url}})

    done = get_job(str(job_id))
    view = body(done)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert "Retry-After" not in done.headers
    signed = view["result"]["outputs"]["quicklook_png"]
    assert signed.startswith(url + "?")
    assert httpx.get(signed).content == b"\x89PNG quicklook"
    assert app_deps.settings.result_sas_ttl == timedelta(hours=1)


def test_unknown_job_is_404(app_deps: Deps) -> None:
    assert get_job(str(uuid.uuid4())).status_code == 404


@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_broker_down_fails_the_job_and_answers_503(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    assert post_job(geotiffs.real()).status_code == 202  # the sender is linked
    servicebus_emulator.stop()
    response = post_job(geotiffs.real(geotiffs.RGBN), params={"bands": "B02,B03,B04,B08"})
    gc.collect()  # azure-servicebus leaves the broken connection's socket to the garbage collector
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    problem = body(response)
    assert problem["code"] == "enqueue_failed"
    status = body(get_job(problem["job_id"]))
    assert status["status"] == "failed"
    assert status["error"]["code"] == "enqueue_failed"


@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_a_retry_with_the_same_key_after_a_503_is_queued(app_deps: Deps, servicebus_emulator: EmulatorHandle) -> None:
    data = geotiffs.real(geotiffs.RGBN)
    params = {"bands": "B02,B03,B04,B08"}
    servicebus_emulator.stop()
    failed = post_job(data, params=params, headers={"Idempotency-Key": "retry-it"})
    gc.collect()
    assert failed.status_code == 503
    job_id = body(failed)["job_id"]
    servicebus_emulator.start()
    retried = post_job(data, params=params, headers={"Idempotency-Key": "retry-it"})
    assert retried.status_code == 200
    assert (body(retried)["job_id"], body(retried)["status"]) == (job_id, "queued")
    assert [decode(m).job_id for m in queued_messages(servicebus_emulator)] == [uuid.UUID(job_id)]
    assert body(get_job(job_id))["status"] == "queued"
    assert app_deps.repo.stale_unsent(timedelta(0), limit=10) == []  # recorded as sent


@pytest.mark.parametrize("stored", [True, False], ids=["image-stored", "image-missing"])
def test_resend_of_a_job_whose_submit_died(app_deps: Deps, servicebus_emulator: EmulatorHandle, stored: bool) -> None:
    """What the worker's sweeper does for a job inserted but never sent, through the real adapters."""
    data = geotiffs.real(geotiffs.RGBN)
    job_id = uuid.uuid4()
    app_deps.repo.create(
        job_id=job_id,
        input_blob=input_blob_name(job_id),
        input_sha256=hashlib.sha256(data).hexdigest(),
        params={"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"},
        idempotency_key=None,
    )
    assert isinstance(app_deps.blobs, BlobStore)
    if stored:
        app_deps.blobs.put_input(job_id, data, hashlib.sha256(data).hexdigest())
    [stale] = app_deps.repo.stale_unsent(timedelta(0), limit=10)
    assert stale.job_id == job_id
    assert resend(stale, app_deps.blobs, app_deps.publisher, app_deps.repo) is stored
    assert app_deps.repo.stale_unsent(timedelta(0), limit=10) == []
    job = app_deps.repo.get(job_id)
    assert job is not None
    messages = [decode(m) for m in queued_messages(servicebus_emulator)]
    if stored:
        assert (job.status.value, job.enqueued_at is not None) == ("queued", True)
        assert [(m.job_id, m.bands, m.input_blob) for m in messages] == [
            (job_id, stale.params["bands"], stale.input_blob)
        ]
    else:
        assert (job.status.value, job.error_code) == ("failed", "enqueue_failed")
        assert messages == []


def _open_pools() -> list[ConnectionPool]:
    return [o for o in gc.get_objects() if type(o) is ConnectionPool and not o.closed]  # type() never warns


@pytest.mark.parametrize(
    ("name", "value"),
    [("ServiceBusConnection", "Endpoint=nonsense"), ("AzureWebJobsStorage", "not a connection string")],
    ids=["bad-servicebus", "bad-storage"],
)
def test_a_failed_build_closes_the_pool_it_opened(
    monkeypatch: pytest.MonkeyPatch, database_url: str, blob_connection_string: str, name: str, value: str
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "AzureWebJobsStorage": blob_connection_string,
        "ServiceBusConnection": "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=v;",
        name: value,
    }
    for key, setting in env.items():
        monkeypatch.setenv(key, setting)
    before = _open_pools()
    for _ in range(3):  # every request tries to build again
        deps.use(None)
        with pytest.raises(ValueError, match=r"onnection [Ss]tring"):
            deps.get()
    deps.use(None)
    assert [p for p in _open_pools() if p not in before] == []
