from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functions import deps
from functions.deps import Deps
from shared.errors import BusUnavailable, DatabaseUnavailable, StorageUnavailable
from shared.jobs import Job
from shared.memory import InMemoryBlobStore, InMemoryJobRepository, InMemoryPublisher
from shared.settings import Settings
from tests import geotiffs
from tests.functions_client import body, get_job, multipart, post_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world() -> Iterator[Deps]:
    settings = Settings.from_env(
        {"ServiceBusConnection": "unused", "AzureWebJobsStorage": "unused", "DATABASE_URL": "unused",
         "MAX_UPLOAD_BYTES": str(5 * 1024 * 1024), "RETRY_AFTER_SECONDS": "3"}
    )  # fmt: skip
    d = Deps(settings, InMemoryJobRepository(), InMemoryBlobStore(), InMemoryPublisher())
    deps.use(d)
    yield d
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
    assert done.stdout.strip() == "['job_status', 'submit_job']"


@pytest.mark.parametrize(
    "content_type", ["image/tiff", "application/octet-stream", "image/tiff; application=geotiff", None]
)
def test_submit_answers_202_with_location(world: Deps, content_type: str | None) -> None:
    response = post_job(geotiffs.real(), content_type=content_type)
    assert response.status_code == 202
    job = body(response)
    assert job["status"] == "queued"
    assert response.headers["Location"] == f"/api/jobs/{job['job_id']}"
    assert job["status_url"] == f"http://127.0.0.1:7071/api/jobs/{job['job_id']}"
    assert response.headers["Retry-After"] == "3"
    assert "Idempotent-Replayed" not in response.headers


def test_submit_multipart(world: Deps) -> None:
    data, content_type = multipart({"image": ("scene.tif", geotiffs.real(geotiffs.RGBN))})
    response = post_job(data, content_type=content_type, params={"bands": "B02,B03,B04,B08"})
    assert response.status_code == 202
    assert isinstance(world.publisher, InMemoryPublisher)
    assert world.publisher.sent[0].bands == ["B02", "B03", "B04", "B08"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"body": b"", "content_type": "image/tiff"}, 400, "empty_body"),
        ({"body": b"just some text", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"body": b'{"image": "x"}', "content_type": "application/json"}, 415, "unsupported_media_type"),
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
def test_submit_refusals_are_problems(world: Deps, kwargs: dict[str, object], status: int, code: str) -> None:
    response = post_job(**kwargs)  # type: ignore[arg-type]
    assert_problem(response, status, code)
    assert isinstance(world.publisher, InMemoryPublisher)
    assert world.publisher.sent == []


def test_idempotency_key(world: Deps) -> None:
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


def test_send_failure_is_a_503_and_the_job_is_failed(world: Deps) -> None:
    assert isinstance(world.publisher, InMemoryPublisher)
    world.publisher.failure = BusUnavailable("emulator down")
    response = post_job(geotiffs.crafted())
    problem = assert_problem(response, 503, "enqueue_failed")
    assert response.headers["Retry-After"] == "3"
    status = body(get_job(str(problem["job_id"])))
    assert status["status"] == "failed"
    assert status["error"]["code"] == "enqueue_failed"


def test_a_retry_with_the_same_key_after_a_503_succeeds(world: Deps) -> None:
    assert isinstance(world.publisher, InMemoryPublisher)
    data = geotiffs.crafted()
    world.publisher.failure = BusUnavailable("emulator down")
    failed = post_job(data, headers={"Idempotency-Key": "retry-1"})
    job_id = assert_problem(failed, 503, "enqueue_failed")["job_id"]
    world.publisher.failure = None
    retried = post_job(data, headers={"Idempotency-Key": "retry-1"})
    assert retried.status_code == 200
    assert body(retried)["job_id"] == job_id
    assert body(retried)["status"] == "queued"
    assert retried.headers["Retry-After"] == "3"
    assert [str(m.job_id) for m in world.publisher.sent] == [job_id]
    assert body(get_job(str(job_id)))["status"] == "queued"


class BrokenRepository(InMemoryJobRepository):
    def get(self, job_id: uuid.UUID) -> None:
        raise DatabaseUnavailable("connection refused")

    def create(self, **kwargs: Any) -> tuple[Job, bool]:
        raise RuntimeError("a bug, with a secret in its message: hunter2")


def test_backend_down_is_503_and_bugs_are_500_without_details(world: Deps, caplog: pytest.LogCaptureFixture) -> None:
    deps.use(Deps(world.settings, BrokenRepository(), world.blobs, world.publisher))
    down = get_job(str(uuid.uuid4()))
    assert_problem(down, 503, "database_unavailable")
    assert down.headers["Retry-After"] == "3"
    with caplog.at_level(logging.ERROR):
        bug = post_job(geotiffs.crafted())
    assert_problem(bug, 500, "internal_error")
    assert b"hunter2" not in bug.get_body()
    assert any(r.exc_info for r in caplog.records)  # the details are logged instead


def test_status_of_a_queued_job(world: Deps) -> None:
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


def test_status_of_a_succeeded_job_signs_output_urls(world: Deps) -> None:
    job_id = uuid.UUID(body(post_job(geotiffs.crafted()))["job_id"])
    url = f"http://127.0.0.1:10000/devstoreaccount1/results/{job_id}/ndvi.tif"
    world.repo.start_attempt(job_id)
    world.repo.succeed(
        job_id, {"analysis": "crop-health", "indices": {"ndvi": {"mean": 0.4}}, "outputs": {"ndvi_cog": url}}
    )
    response = get_job(str(job_id))
    view = body(response)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert view["result"]["indices"]["ndvi"]["mean"] == 0.4
    assert view["result"]["outputs"]["ndvi_cog"] == f"{url}?se=3600"
    assert "Retry-After" not in response.headers


def test_status_of_a_succeeded_job_when_signing_fails(world: Deps, caplog: pytest.LogCaptureFixture) -> None:
    job_id = uuid.UUID(body(post_job(geotiffs.crafted()))["job_id"])
    url = f"http://127.0.0.1:10000/devstoreaccount1/results/{job_id}/ndvi.tif"
    world.repo.succeed(job_id, {"analysis": "crop-health", "outputs": {"ndvi_cog": url, "note": None}})
    assert isinstance(world.blobs, InMemoryBlobStore)
    world.blobs.failure = StorageUnavailable("user delegation key: AuthorizationPermissionMismatch")
    with caplog.at_level(logging.WARNING, logger="shared.status"):
        response = get_job(str(job_id))
    assert response.status_code == 200
    assert body(response)["result"]["outputs"] == {"ndvi_cog": url, "note": None}  # unsigned, still there
    assert [getattr(r, "job_id", None) for r in caplog.records if r.name == "shared.status"] == [str(job_id)]


def test_status_of_a_failed_job(world: Deps) -> None:
    job_id = uuid.UUID(body(post_job(geotiffs.crafted()))["job_id"])
    world.repo.fail(job_id, "invalid_image", "the GeoTIFF cannot be decoded")
    view = body(get_job(str(job_id)))
    assert view["status"] == "failed"
    assert view["error"] == {"code": "invalid_image", "message": "the GeoTIFF cannot be decoded"}


def test_status_unknown_job_is_404(world: Deps) -> None:
    assert_problem(get_job(str(uuid.uuid4())), 404, "job_not_found")


@pytest.mark.parametrize("job_id", ["nope", "1234", "../../etc", "", "{12345678-1234-5678-1234-567812345678}"])
def test_status_malformed_id_is_400(world: Deps, job_id: str) -> None:
    assert_problem(get_job(job_id), 400, "invalid_job_id")
