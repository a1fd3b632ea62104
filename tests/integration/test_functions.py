"""The Functions with real backends: PostgreSQL, Azurite and the Service Bus emulator, dependencies built from the
environment on the first request exactly as in the Function App."""

from __future__ import annotations

import gc
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from azure.functions.timer import TimerRequest
from azure.servicebus import ServiceBusClient
from azure.storage.blob import BlobServiceClient
from psycopg_pool import ConnectionPool

from functions import deps
from functions.deps import Deps
from functions.reconciler import reconcile_jobs
from local.ports import free_port
from shared.bus import JobPublisher
from shared.db import PostgresJobStore
from shared.messages import decode
from shared.migrate import migrate
from shared.storage import BlobStore
from shared.submission import input_blob_name
from tests import geotiffs
from tests.fixtures.servicebus import EmulatorHandle
from tests.functions_client import body, get_job, post_job

pytestmark = pytest.mark.integration


def _environment(database_url: str, blob_connection_string: str, bus: str, suffix: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "AzureWebJobsStorage": blob_connection_string,
        "ServiceBusConnection": bus,
        "IMAGES_CONTAINER": f"images{suffix}",
        "RESULTS_CONTAINER": f"results{suffix}",
        "RETRY_AFTER_SECONDS": "2",
        "RECONCILE_RESEND_AFTER": "PT0S",
        "RECONCILE_ABORT_AFTER": "PT0S",
    }


def _close(built: Deps) -> None:
    assert built.confirms is not None
    built.confirms.close()
    assert isinstance(built.jobs, PostgresJobStore)
    built.jobs._pool.close()
    assert isinstance(built.blobs, BlobStore)
    built.blobs.close()
    assert isinstance(built.publisher, JobPublisher)
    built.publisher.close()


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, database_url: str, blob_connection_string: str, servicebus_emulator: EmulatorHandle
) -> Iterator[Callable[..., Deps]]:
    """``environment(**overrides)``: set the app settings and build the dependencies as the first request does."""
    migrate(database_url)
    suffix = uuid.uuid4().hex[:10]
    base = _environment(database_url, blob_connection_string, servicebus_emulator.connection_string, suffix)
    with BlobServiceClient.from_connection_string(blob_connection_string) as client:
        client.create_container(base["IMAGES_CONTAINER"])
        client.create_container(base["RESULTS_CONTAINER"])
    built: list[Deps] = []

    def build(**overrides: str) -> Deps:
        for name, value in {**base, **overrides}.items():
            monkeypatch.setenv(name, value)
        deps.use(None)
        built.append(deps.get())  # what the first request does
        return built[-1]

    yield build
    deps.use(None)
    for each in built:
        _close(each)


@pytest.fixture
def app_deps(environment: Callable[..., Deps]) -> Deps:
    return environment()


def queued_messages(emulator: EmulatorHandle) -> list[tuple[str, bytes]]:
    with (
        ServiceBusClient.from_connection_string(emulator.connection_string) as client,
        client.get_queue_receiver(emulator.queue_name) as receiver,
    ):
        return [(str(m.message_id), b"".join(m.body)) for m in receiver.peek_messages(max_message_count=50)]


def reconcile() -> None:
    """One run of the timer Function, called as the host calls it."""
    reconcile_jobs(TimerRequest(past_due=False))


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
        row = conn.execute(
            "SELECT status, idempotency_key, generation, sent_at IS NOT NULL FROM jobs WHERE job_id = %s", (job_id,)
        ).fetchone()
    assert row == ("queued", "it-1", 1, True)
    [(message_id, raw)] = queued_messages(servicebus_emulator)
    message = decode(raw)
    assert (message_id, message.job_id, message.generation) == (f"{job_id}:1", job_id, 1)
    assert message.bands[3] == "B04"

    replay = post_job(data, headers={"Idempotency-Key": "it-1"})
    assert replay.status_code == 200
    assert body(replay)["job_id"] == str(job_id)
    assert len(queued_messages(servicebus_emulator)) == 1  # confirmed: nothing sent again
    assert post_job(geotiffs.real(geotiffs.RGBN), headers={"Idempotency-Key": "it-1"}).status_code == 409


def test_status_through_the_job_lifecycle(app_deps: Deps, tmp_path: Path) -> None:
    job_id = uuid.UUID(body(post_job(geotiffs.real()))["job_id"])
    queued = get_job(str(job_id))
    assert body(queued)["status"] == "queued"
    assert queued.headers["Retry-After"] == "2"

    # What the worker does, through the same adapters.
    assert isinstance(app_deps.blobs, BlobStore)
    job = app_deps.jobs.claim(job_id, worker_id="w", lease=timedelta(minutes=1), max_attempts=5)
    assert job is not None
    assert body(get_job(str(job_id)))["status"] == "running"
    png = tmp_path / "quicklook.png"
    png.write_bytes(b"\x89PNG quicklook")
    url = app_deps.blobs.put_result(job_id, job.attempts, "quicklook.png", png, "image/png")
    assert f"/{job_id}/1/quicklook.png" in url
    app_deps.jobs.succeed(job_id, job.attempts, {"analysis": "crop-health", "outputs": {"quicklook_png": url}})

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
def test_broker_down_accepts_the_job_fast_and_the_reconciler_hands_it_over(
    app_deps: Deps, servicebus_emulator: EmulatorHandle
) -> None:
    """The row is the outbox: with the bus down, the job is accepted (202, queued, send unconfirmed), the next
    submits do not wait on the bus, and the timer reconciler sends it once the bus is back."""
    assert post_job(geotiffs.real()).status_code == 202  # the sender is linked
    servicebus_emulator.stop()
    params = {"bands": "B02,B03,B04,B08"}
    started = time.monotonic()
    first = post_job(geotiffs.real(geotiffs.RGBN), params=params)
    first_s = time.monotonic() - started
    started = time.monotonic()
    second = post_job(geotiffs.real(geotiffs.RGBN), params=params)
    second_s = time.monotonic() - started
    gc.collect()  # azure-servicebus leaves the broken connection's socket to the garbage collector
    assert (first.status_code, second.status_code) == (202, 202)
    assert first_s < 4  # BUS_SEND_TIMEOUT=2
    assert second_s < 1  # the publisher's cooldown: no wait on a bus that just failed
    job_ids = [body(r)["job_id"] for r in (first, second)]
    for job_id in job_ids:
        status = body(get_job(job_id))
        assert status["status"] == "queued"
    servicebus_emulator.start()
    time.sleep(10)  # past the publisher's cooldown
    reconcile()
    sent = {message_id for message_id, _ in queued_messages(servicebus_emulator)}
    assert {f"{job_id}:2" for job_id in job_ids} <= sent
    for job_id in job_ids:
        job = app_deps.jobs.get(uuid.UUID(job_id))
        assert job is not None
        assert (job.status.value, job.generation, job.sent_at is not None) == ("queued", 2, True)


def test_storage_down_fails_the_submit_fast_and_a_same_key_retry_resubmits(
    environment: Callable[..., Deps], blob_connection_string: str, servicebus_emulator: EmulatorHandle
) -> None:
    closed = blob_connection_string.replace(_blob_port(blob_connection_string), str(free_port()))
    environment(AzureWebJobsStorage=closed)  # the default STORAGE_RETRY_TOTAL
    data = geotiffs.real(geotiffs.RGBN)
    params = {"bands": "B02,B03,B04,B08"}
    assert get_job(str(uuid.uuid4())).status_code == 404  # a first request has built the clients
    started = time.monotonic()
    failed = post_job(data, params=params, headers={"Idempotency-Key": "retry-it"})
    elapsed = time.monotonic() - started
    assert failed.status_code == 503
    assert elapsed < 3  # STORAGE_RETRY_TOTAL=1: one retry after 1 s
    assert failed.headers["Retry-After"] == "2"
    problem = body(failed)
    assert problem["code"] == "enqueue_failed"
    assert "Error" not in problem["detail"]
    assert "127.0.0.1" not in problem["detail"]
    job_id = problem["job_id"]
    assert body(get_job(job_id))["error"]["code"] == "enqueue_failed"

    environment()  # storage is back
    retried = post_job(data, params=params, headers={"Idempotency-Key": "retry-it"})
    assert retried.status_code == 200
    assert (body(retried)["job_id"], body(retried)["status"]) == (job_id, "queued")
    assert [m for m, _ in queued_messages(servicebus_emulator)] == [f"{job_id}:2"]


def test_database_down_answers_503_within_seconds_and_names_no_driver(environment: Callable[..., Deps]) -> None:
    environment(DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/nothing", DB_POOL_MIN_SIZE="0")
    assert get_job(str(uuid.uuid4())).status_code == 503  # a first request has built the clients
    started = time.monotonic()
    response = post_job(geotiffs.real())
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert elapsed < 3  # DB_POOL_TIMEOUT=2
    problem = body(response)
    assert problem["code"] == "database_unavailable"
    assert "Pool" not in problem["detail"]
    assert "psycopg" not in problem["detail"].lower()


@pytest.mark.parametrize("stored", [True, False], ids=["image-stored", "image-missing"])
def test_the_reconciler_function_heals_a_job_whose_submit_died(
    app_deps: Deps, servicebus_emulator: EmulatorHandle, stored: bool
) -> None:
    """A job inserted but never sent (the host died in between), healed by the timer Function alone."""
    data = geotiffs.real(geotiffs.RGBN)
    job_id = uuid.uuid4()
    app_deps.jobs.create(
        job_id=job_id,
        input_blob=input_blob_name(job_id),
        input_sha256=hashlib.sha256(data).hexdigest(),
        params={"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"},
        idempotency_key=None,
    )
    assert isinstance(app_deps.blobs, BlobStore)
    if stored:
        app_deps.blobs.put_input(job_id, data, hashlib.sha256(data).hexdigest())
    reconcile()
    job = app_deps.jobs.get(job_id)
    assert job is not None
    messages = queued_messages(servicebus_emulator)
    if stored:
        assert (job.status.value, job.generation, job.sent_at is not None) == ("queued", 2, True)
        assert [(m, decode(raw).input_blob) for m, raw in messages] == [(f"{job_id}:2", job.input_blob)]
    else:
        assert (job.status.value, job.error_code) == ("failed", "enqueue_failed")
        assert messages == []
    reconcile()
    assert app_deps.jobs.get(job_id) == job  # idempotent


def _blob_port(connection_string: str) -> str:
    endpoint = next(p for p in connection_string.split(";") if p.startswith("BlobEndpoint="))
    return endpoint.split(":")[2].split("/")[0]


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
