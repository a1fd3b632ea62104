from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from azure.functions.timer import TimerRequest

from functions import deps
from functions.deps import Deps
from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.reconciler import STALL_MARGIN, Letter
from shared.settings import Settings
from tests import geotiffs
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryPublisher, RecordingOutbox, unit_deps
from tests.functions_client import body, function, get_job, multipart, post_job
from tests.jobs import claimed, new_job

ROOT = Path(__file__).resolve().parents[2]


class Inbox:
    """The dead-letter sub-queue for one reconciler run: a context manager, as ``DeadLetterInbox`` is."""

    def __init__(self) -> None:
        self.pending: list[Letter] = []
        self.completed: list[Letter] = []
        self.opened = self.closed = 0

    def __enter__(self) -> Inbox:
        self.opened += 1
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.closed += 1

    def receive(self, max_count: int) -> list[Letter]:
        batch, self.pending = self.pending[:max_count], self.pending[max_count:]
        return batch

    def complete(self, letter: Letter) -> None:
        self.completed.append(letter)


class World:
    """The Functions' dependencies, in memory (what :func:`functions.deps.use` installs)."""

    def __init__(self, **environ: str) -> None:
        self.settings = Settings.from_env(
            {"ServiceBusConnection": "unused", "AzureWebJobsStorage": "unused", "DATABASE_URL": "unused",
             "MAX_UPLOAD_BYTES": str(5 * 1024 * 1024), "RETRY_AFTER_SECONDS": "3", **environ}
        )  # fmt: skip
        self.jobs = InMemoryJobStore()
        self.blobs = InMemoryBlobStore()
        self.publisher = InMemoryPublisher()
        self.inbox = Inbox()

    def deps(self) -> Deps:
        return unit_deps(
            self.settings, jobs=self.jobs, blobs=self.blobs, publisher=self.publisher, dead_letters=lambda: self.inbox
        )

    def job(self, job_id: object) -> Job:
        job = self.jobs.get(uuid.UUID(str(job_id)))
        assert job is not None
        return job


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    deps.use(w.deps())
    yield w
    deps.use(None)


def assert_problem(response: object, status: int, code: str) -> dict[str, object]:
    from azure.functions import HttpResponse

    assert isinstance(response, HttpResponse)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    problem = body(response)
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"]
    assert problem["title"]
    assert problem["detail"]
    assert "Traceback" not in response.get_body().decode()
    return dict(problem)


def test_importing_the_app_reads_no_setting_and_opens_no_socket() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('socket opened at import time')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import function_app\n"
        "print(sorted(f.get_function_name() for f in function_app.app.get_functions()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={}, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "['batch_status', 'cancel_job', 'create_upload', 'dead_letters', 'deliver_webhook', 'health', 'job_status',"
        " 'list_jobs',"
        " 'openapi', 'reconcile_jobs', 'replay_dead_letters', 'retry_job', 'stats', 'submit_batch', 'submit_job']"
    )


@pytest.mark.parametrize(
    "content_type", ["image/tiff", "application/octet-stream", "image/tiff; application=geotiff", None]
)
def test_submit_answers_202_with_location(world: World, content_type: str | None) -> None:
    response = post_job(geotiffs.real(), content_type=content_type)
    assert response.status_code == 202
    job = body(response)
    assert job["status"] == "queued"
    assert response.headers["Location"] == f"/api/jobs/{job['job_id']}"
    assert job["status_url"] == f"http://127.0.0.1:7071/api/jobs/{job['job_id']}"
    assert response.headers["Retry-After"] == "3"
    assert "Idempotent-Replayed" not in response.headers


def test_submit_multipart(world: World) -> None:
    data, content_type = multipart({"image": ("scene.tif", geotiffs.real(geotiffs.RGBN))})
    response = post_job(data, content_type=content_type, params={"bands": "B02,B03,B04,B08"})
    assert response.status_code == 202
    assert world.publisher.messages[0].bands == ["B02", "B03", "B04", "B08"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"body": b"", "content_type": "image/tiff"}, 400, "empty_body"),
        ({"body": b"just some text", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"body": b'{"image": "x"}', "content_type": "application/json"}, 400, "invalid_request_body"),  # by reference
        ({"body": b"just some text", "content_type": "image/tiff"}, 400, "not_a_tiff"),
        ({"body": b"just some text", "content_type": "application/octet-stream"}, 400, "not_a_tiff"),
        ({"body": geotiffs.real()[:400_000]}, 422, "unreadable_image"),
        ({"body": geotiffs.huge_sparse()}, 422, "image_too_large"),
        ({"body": b"\0" * (5 * 1024 * 1024 + 1)}, 413, "payload_too_large"),
        ({"body": geotiffs.crafted(descriptions=None)}, 422, "bands_required"),
        ({"body": geotiffs.crafted(), "params": {"bands": "B02,B03,B04,B05"}}, 422, "missing_bands"),
        ({"body": geotiffs.crafted(), "params": {"scale": "zero"}}, 400, "invalid_scale"),
        ({"body": geotiffs.crafted(), "params": {"analysis": "magic"}}, 400, "invalid_analysis"),
        ({"body": b"--x\r\nbroken", "content_type": "multipart/form-data; boundary=x"}, 400, "missing_image_field"),
        (
            {"body": multipart({"file": ("a.tif", geotiffs.crafted())})[0], "content_type": multipart({})[1]},
            400,
            "missing_image_field",
        ),
    ],
)
def test_submit_refusals_are_problems(world: World, kwargs: dict[str, object], status: int, code: str) -> None:
    response = post_job(**kwargs)  # type: ignore[arg-type]
    assert_problem(response, status, code)
    assert world.publisher.sent == []


def test_idempotency_key(world: World) -> None:
    data = geotiffs.crafted()
    first = post_job(data, headers={"Idempotency-Key": "abc-1"})
    again = post_job(data, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202
    assert again.status_code == 200
    assert body(again) == body(first)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    conflict = post_job(geotiffs.crafted(dtype="float32"), headers={"Idempotency-Key": "abc-1"})
    problem = assert_problem(conflict, 409, "idempotency_conflict")
    assert problem["job_id"] == body(first)["job_id"]


def test_an_ambiguous_send_still_answers_202_and_the_job_stays_queued(world: World) -> None:
    world.publisher.failure = BusUnavailable("emulator down")
    response = post_job(geotiffs.crafted())
    assert response.status_code == 202
    job = world.job(body(response)["job_id"])
    assert (job.status, job.sent_at) == (JobStatus.QUEUED, None)  # the reconciler sends it
    assert body(get_job(str(job.job_id)))["status"] == "queued"


def test_an_upload_failure_is_a_503_and_the_job_is_failed(world: World) -> None:
    world.blobs.failure = StorageUnavailable("azurite down at 10.0.0.4")
    response = post_job(geotiffs.crafted())
    problem = assert_problem(response, 503, "enqueue_failed")
    assert response.headers["Retry-After"] == "3"
    assert "10.0.0.4" not in str(problem["detail"])
    status = body(get_job(str(problem["job_id"])))
    assert status["status"] == "failed"
    assert status["error"]["code"] == "enqueue_failed"
    assert world.publisher.sent == []


def test_a_retry_with_the_same_key_after_a_503_succeeds(world: World) -> None:
    data = geotiffs.crafted()
    world.blobs.failure = StorageUnavailable("azurite down")
    failed = post_job(data, headers={"Idempotency-Key": "retry-1"})
    job_id = assert_problem(failed, 503, "enqueue_failed")["job_id"]
    world.blobs.failure = None
    retried = post_job(data, headers={"Idempotency-Key": "retry-1"})
    assert retried.status_code == 200
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert body(retried)["job_id"] == job_id
    assert body(retried)["status"] == "queued"
    assert retried.headers["Retry-After"] == "3"
    assert [m.message_id for m in world.publisher.messages] == [f"{job_id}:2"]
    assert body(get_job(str(job_id)))["status"] == "queued"


class BrokenJobStore(InMemoryJobStore):
    def get(self, job_id: uuid.UUID) -> None:
        raise DatabaseUnavailable("connection refused at 10.0.0.4")

    def create(self, **kwargs: Any) -> tuple[Job, bool]:
        raise RuntimeError("a bug, with a secret in its message: hunter2")


def test_backend_down_is_503_and_bugs_are_500_without_details(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.jobs = BrokenJobStore()
    deps.use(world.deps())
    down = get_job(str(uuid.uuid4()))
    assert_problem(down, 503, "database_unavailable")
    assert down.headers["Retry-After"] == "3"
    assert b"10.0.0.4" not in down.get_body()
    with caplog.at_level(logging.ERROR):
        bug = post_job(geotiffs.crafted())
    assert_problem(bug, 500, "internal_error")
    assert b"hunter2" not in bug.get_body()
    assert any(r.exc_info for r in caplog.records)  # the details are logged instead


def test_status_of_a_queued_job(world: World) -> None:
    job_id = body(post_job(geotiffs.crafted()))["job_id"]
    response = get_job(job_id)
    assert response.status_code == 200
    view = body(response)
    assert view["job_id"] == job_id
    assert view["status"] == "queued"
    assert view["attempts"] == 0
    assert view["created_at"]
    assert view["updated_at"]
    assert "result" not in view
    assert "error" not in view
    assert response.headers["Retry-After"] == "3"
    assert response.headers["Cache-Control"] == "no-store"


def test_status_of_a_running_job(world: World) -> None:
    job = claimed(world.jobs, world.job(body(post_job(geotiffs.crafted()))["job_id"]))
    response = get_job(str(job.job_id))
    assert (body(response)["status"], body(response)["attempts"]) == ("running", 1)
    assert response.headers["Retry-After"] == "3"


def _succeeded(world: World, result: dict[str, Any]) -> uuid.UUID:
    job = claimed(world.jobs, world.job(body(post_job(geotiffs.crafted()))["job_id"]))
    assert world.jobs.succeed(job.job_id, job.attempts, result) is not None
    return job.job_id


def test_status_of_a_succeeded_job_signs_output_urls(world: World) -> None:
    url = "http://127.0.0.1:10000/devstoreaccount1/results/j/1/ndvi.tif"
    result = {"analysis": "crop-health", "attempt": 1, "indices": {"ndvi": {"mean": 0.4}}, "outputs": {"ndvi_cog": url}}
    job_id = _succeeded(world, result)
    response = get_job(str(job_id))
    view = body(response)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert view["result"]["attempt"] == 1
    assert view["result"]["indices"]["ndvi"]["mean"] == 0.4
    assert view["result"]["outputs"]["ndvi_cog"] == f"{url}?se=3600"
    assert "Retry-After" not in response.headers


def test_status_of_a_succeeded_job_when_signing_fails(world: World, caplog: pytest.LogCaptureFixture) -> None:
    url = "http://127.0.0.1:10000/devstoreaccount1/results/j/1/ndvi.tif"
    job_id = _succeeded(world, {"analysis": "crop-health", "outputs": {"ndvi_cog": url, "note": None}})
    world.blobs.failure = StorageUnavailable("user delegation key: AuthorizationPermissionMismatch")
    with caplog.at_level(logging.WARNING, logger="shared.status"):
        response = get_job(str(job_id))
    assert response.status_code == 200
    assert body(response)["result"]["outputs"] == {"ndvi_cog": url, "note": None}  # unsigned, still there
    assert [getattr(r, "job_id", None) for r in caplog.records if r.name == "shared.status"] == [str(job_id)]


def test_status_of_a_failed_job(world: World) -> None:
    job = claimed(world.jobs, world.job(body(post_job(geotiffs.crafted()))["job_id"]))
    world.jobs.fail(job.job_id, job.attempts, "invalid_image", "the GeoTIFF cannot be decoded")
    response = get_job(str(job.job_id))
    view = body(response)
    assert view["status"] == "failed"
    assert view["error"] == {"code": "invalid_image", "message": "the GeoTIFF cannot be decoded"}
    assert "Retry-After" not in response.headers


# The reconciler's timer function


@pytest.fixture
def old_enough() -> Iterator[World]:
    w = World(RECONCILE_RESEND_AFTER="-PT1S")  # every unconfirmed job is old enough
    deps.use(w.deps())
    yield w
    deps.use(None)


def test_reconcile_jobs_hands_over_an_unconfirmed_job_and_drains_the_dead_letters(old_enough: World) -> None:
    world = old_enough
    unsent = new_job(world.jobs, store=world.blobs)
    queued = new_job(world.jobs, store=world.blobs)
    queued = world.jobs.confirm_sent(queued.job_id, queued.generation) or queued
    letter = Letter(
        message_id=f"{queued.job_id}:1", sequence_number=1, job_id=queued.job_id, generation=1,
        reason="TTLExpiredException", description="expired", delivery_count=1, enqueued_at=None, token=None,
    )  # fmt: skip
    world.inbox.pending.append(letter)
    function("reconcile_jobs")(TimerRequest(past_due=False))
    assert [m.message_id for m in world.publisher.messages] == [f"{unsent.job_id}:2"]
    assert world.job(unsent.job_id).sent_at is not None
    assert (world.job(queued.job_id).status, world.job(queued.job_id).error_code) == (
        JobStatus.FAILED, "message_expired",
    )  # fmt: skip
    assert world.inbox.completed == [letter]
    assert (world.inbox.opened, world.inbox.closed) == (1, 1)  # one receiver per run, closed after it


def test_reconcile_jobs_uses_the_lifecycle_settings(world: World) -> None:
    unsent = new_job(world.jobs, store=world.blobs)  # younger than RECONCILE_RESEND_AFTER (2 minutes)
    function("reconcile_jobs")(TimerRequest(past_due=False))
    assert world.job(unsent.job_id) == unsent
    assert world.publisher.sent == []


def test_a_past_due_run_is_logged_and_reconciles_the_same(old_enough: World, caplog: pytest.LogCaptureFixture) -> None:
    unsent = new_job(old_enough.jobs, store=old_enough.blobs)
    function("reconcile_jobs")(TimerRequest(past_due=True))
    assert "reconcile_past_due" in [getattr(r, "action", None) for r in caplog.records]
    assert old_enough.job(unsent.job_id).generation == 2


def test_reconcile_jobs_resumes_webhook_deliveries_stalled_past_the_longest_backoff() -> None:
    world = World(WEBHOOK_BACKOFF_MAX="PT2M", RECONCILE_BATCH="7")
    outbox = RecordingOutbox()
    deps.use(replace(world.deps(), notifier=outbox))
    try:
        function("reconcile_jobs")(TimerRequest(past_due=False))
    finally:
        deps.use(None)
    assert outbox.resumes == [(timedelta(minutes=2) + STALL_MARGIN, 7)]


def test_status_unknown_job_is_404(world: World) -> None:
    assert_problem(get_job(str(uuid.uuid4())), 404, "job_not_found")


@pytest.mark.parametrize("job_id", ["nope", "1234", "../../etc", "", "{12345678-1234-5678-1234-567812345678}"])
def test_status_malformed_id_is_400(world: World, job_id: str) -> None:
    assert_problem(get_job(job_id), 400, "invalid_job_id")
