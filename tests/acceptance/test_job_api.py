"""The job API's control endpoints on the real local Functions host, with real workers: cancel of a queued job,
admission control (a second host with ``MAX_BACKLOG=1``), a message that expires into the dead-letter queue and is
replayed, a failed job retried to success, and a batch of three real GeoTIFFs.

The first tests take the workers away, so that the jobs they submit stay queued; the later ones start one.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.servicebus import ServiceBusClient

from local.processes import stop
from local.services import Launcher
from local.stack import REPO_ROOT
from shared.bus import job_message
from shared.db import PostgresJobStore, open_pool
from shared.messages import JobMessage
from shared.settings import Settings
from shared.storage import BlobStore
from shared.submission import input_blob_name
from tests.acceptance.client import poll, submit
from tests.acceptance.harness import Stack
from tests.job_api_client import form

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[1] / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"
COAST = DATA / "s2_l1c_coast_256.tif"
RGBN = DATA / "s2_rgbn_fields_128.tif"


@pytest.fixture(scope="module")
def jobs(stack: Stack) -> Iterator[PostgresJobStore]:
    with open_pool(Settings.from_env(stack.service_env)) as pool:
        yield PostgresJobStore(pool)


@pytest.fixture(scope="module")
def later() -> list[str]:
    """Locations of jobs a later test of this module runs to success once a worker is there."""
    return []


def test_cancel_of_a_queued_job(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()
    location = submit(api, RGBN.read_bytes()).headers["Location"]
    cancelled = api.delete(location)
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["cancel_requested"]) == ("cancelled", False)
    assert api.get(location).json()["status"] == "cancelled"
    assert api.delete(location).status_code == 200
    assert api.post(f"{location}/retry").status_code == 202  # and back: it runs later
    assert api.get(location).json()["retries"] == 1


def test_a_full_backlog_is_429_on_a_host_with_max_backlog_1(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()
    first = submit(api, RGBN.read_bytes(), Idempotency_Key=f"backlog-{uuid.uuid4()}")
    assert first.status_code == 202
    root = Path(tempfile.mkdtemp(prefix="backlog-", dir=stack.root))
    env = {**stack.service_env, "MAX_BACKLOG": "1", "RECONCILE_SCHEDULE": "0 0 0 1 1 *"}  # no second reconciler
    url, host = Launcher(root, REPO_ROOT, stack.service_env).functions_host(0, env)
    try:
        with httpx.Client(base_url=httpx.URL(url).copy_with(path="/"), timeout=60) as bounded:
            full = submit(bounded, RGBN.read_bytes())
            assert full.status_code == 429, full.text
            assert (full.json()["code"], int(full.headers["Retry-After"])) == ("backlog_full", 1)
            data, content_type = form([RGBN.read_bytes()])
            batch = bounded.post("/api/batches", content=data, headers={"Content-Type": content_type})
            assert (batch.status_code, batch.json()["code"]) == (429, "backlog_full")
            replay = submit(bounded, RGBN.read_bytes(), Idempotency_Key=first.request.headers["Idempotency-Key"])
            assert (replay.status_code, replay.json()["job_id"]) == (200, first.json()["job_id"])
    finally:
        stop(host)
    assert api.delete(first.headers["Location"]).status_code == 200


def test_an_expired_message_is_dead_lettered_listed_and_replayed(
    stack: Stack, api: httpx.Client, jobs: PostgresJobStore, later: list[str]
) -> None:
    """A queued job whose message expires with no worker: the emulator dead-letters it (TTLExpiredException), the
    timer reconciler drains it (the job fails ``message_expired``, the dead letter is recorded), and the replay
    queues the job again."""
    stack.stop_workers()
    settings = Settings.from_env(stack.service_env)
    data = RGBN.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    job_id = uuid.uuid4()
    params = {"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}
    job, _ = jobs.create(job_id=job_id, input_blob=input_blob_name(job_id), input_sha256=sha256, params=params,
                         idempotency_key=None)  # fmt: skip
    store = BlobStore.from_settings(settings)
    try:
        store.put_input(job_id, data, sha256)
    finally:
        store.close()
    message = job_message(JobMessage.for_job(job))
    message.time_to_live = timedelta(seconds=1)
    assert settings.servicebus_connection_string is not None
    with (
        ServiceBusClient.from_connection_string(settings.servicebus_connection_string) as client,
        client.get_queue_sender(settings.jobs_queue) as sender,
    ):
        sender.send_messages(message)
    assert jobs.confirm_sent(job_id, job.generation) is not None  # as the submit would: no resend

    letter = _wait_for(lambda: _dead_letter(api, job_id), timeout=30)
    assert (letter["reason"], letter["action"], letter["job_status"]) == ("TTLExpiredException", "failed", "failed")
    assert api.get(f"/api/jobs/{job_id}").json()["error"]["code"] == "message_expired"

    replayed = api.post("/api/dead-letters/replay", json={"reason": "TTLExpiredException", "limit": 1000})
    assert replayed.status_code == 200, replayed.text
    assert str(job_id) in replayed.json()["replayed"]
    view = api.get(f"/api/jobs/{job_id}").json()
    assert (view["status"], view["retries"]) == ("queued", 1)
    later.append(f"/api/jobs/{job_id}")


def test_a_failed_job_retried_reaches_succeeded(
    stack: Stack, api: httpx.Client, jobs: PostgresJobStore, later: list[str]
) -> None:
    stack.stop_workers()
    location = submit(api, RGBN.read_bytes(), params={"priority": "high"}).headers["Location"]
    job_id = uuid.UUID(location.rsplit("/", 1)[1])
    attempt = jobs.claim(job_id, worker_id="acceptance", lease=timedelta(minutes=1), max_attempts=5)
    assert attempt is not None  # an attempt that failed for good, as a worker fails one
    assert jobs.fail(job_id, attempt.attempts, "timed_out", "the attempt ran past JOB_TIMEOUT") is not None
    assert api.post(f"{location}/retry").status_code == 202

    stack.ensure_worker()
    final = poll(api, location, timeout=90)
    assert (final["status"], final["attempts"], final["retries"]) == ("succeeded", 2, 1), final
    for other in later:  # the dead-lettered job replayed above
        assert poll(api, other, timeout=60)["status"] == "succeeded"


@pytest.mark.usefixtures("worker")
def test_a_batch_of_three_real_geotiffs_completes(api: httpx.Client) -> None:
    data, content_type = form([FIELDS.read_bytes(), COAST.read_bytes(), RGBN.read_bytes()])
    response = api.post("/api/batches", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert len(accepted["jobs"]) == 3
    location = response.headers["Location"]
    view = _wait_for(lambda: _completed(api, location), timeout=120)
    assert view["counts"]["succeeded"] == 3, view
    for job in accepted["jobs"]:
        result = api.get(f"/api/jobs/{job['job_id']}").json()
        assert result["batch_id"] == accepted["batch_id"]
        assert -1 <= result["result"]["indices"]["ndvi"]["mean"] <= 1


def _completed(api: httpx.Client, location: str) -> dict[str, Any] | None:
    view: dict[str, Any] = api.get(location).json()
    return view if view["status"] == "completed" else None


def _dead_letter(api: httpx.Client, job_id: uuid.UUID) -> dict[str, Any] | None:
    letters = api.get("/api/dead-letters", params={"action": "failed", "limit": 1000}).json()["dead_letters"]
    return next((d for d in letters if d["job_id"] == str(job_id)), None)


def _wait_for(probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"not seen within {timeout:.0f} s"
        time.sleep(0.5)
    return found
