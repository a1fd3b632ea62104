"""The status view and a job's summary: their fields, signed output URLs, and error messages (only texts written for
clients)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.errors import StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.rejection import Rejected
from shared.status import FIXED_MESSAGES, GENERIC_MESSAGE, JobSummary, JobView, job_view, parse_job_id, view_of
from tests.fakes import InMemoryBlobStore
from tests.jobs import PARAMS, job_record

JOB_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
INTERNAL = "retries exhausted after 5 deliveries; last error: KeyError: 'nir' (psycopg.OperationalError at 10.0.0.4)"


def failed(code: str | None, message: str | None) -> Job:
    return job_record(JobStatus.FAILED, attempts=5, error_code=code, error_message=message)


def error_of(job: Job) -> dict[str, str]:
    error: dict[str, str] = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))["error"]
    return error


@pytest.mark.parametrize(
    "code",
    [
        "invalid_image",
        "no_valid_pixels",
        "geometry_outside_scene",
        "input_missing",
        "input_changed",
        "input_refused",
        "image_url_not_allowed",
        "unknown_analysis",
        "invalid_message",
        "timed_out",
    ],
)
def test_permanent_input_errors_show_their_message(code: str) -> None:
    text = "message dead-lettered (InvalidImage): band 4 has no NIR reflectance"
    assert error_of(failed(code, text)) == {"code": code, "message": text}


@pytest.mark.parametrize(
    "code",
    ["retries_exhausted", "internal_error", "max_delivery_count_exceeded", "message_expired", "dead_lettered",
     "database_unavailable", "something_new"],
)  # fmt: skip
def test_other_errors_show_a_generic_message(code: str) -> None:
    assert error_of(failed(code, INTERNAL)) == {"code": code, "message": GENERIC_MESSAGE}


def test_enqueue_failed_shows_a_fixed_text() -> None:
    stored = "could not queue the job: could not send to queue 'jobs': ServiceBusConnectionError: amqp://10.0.0.4"
    assert error_of(failed("enqueue_failed", stored)) == {
        "code": "enqueue_failed",
        "message": FIXED_MESSAGES["enqueue_failed"],
    }


def test_a_client_code_without_a_message_gets_the_generic_text() -> None:
    assert error_of(failed("invalid_image", None))["message"] == GENERIC_MESSAGE


def test_a_running_job_shows_every_field_but_result_and_error() -> None:
    job = job_record(JobStatus.RUNNING, attempts=2, params=PARAMS, started_at=datetime.now(UTC))
    view = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert view == {
        "job_id": str(job.job_id),
        "status": "running",
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "attempts": 2,
        "analysis": "crop-health",
        "priority": "normal",
        "progress": None,
        "cancel_requested": False,
        "retries": 0,
        "batch_id": None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": None,
    }


def test_the_job_api_fields() -> None:
    batch_id, now = uuid.uuid4(), datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
    progress = {"stage": "indices", "fraction": 0.5, "updated_at": now.isoformat(), "window": 3}
    job = job_record(
        JobStatus.RUNNING, priority="high", progress=progress, cancel_requested_at=now, retries=2, batch_id=batch_id,
        started_at=now, finished_at=None,
    )  # fmt: skip
    view = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert {k: view[k] for k in ("priority", "progress", "cancel_requested", "retries", "batch_id", "started_at")} == {
        "priority": "high",
        "progress": {"stage": "indices", "fraction": 0.5, "updated_at": "2025-01-31T12:00:00.123456+00:00"},
        "cancel_requested": True,
        "retries": 2,
        "batch_id": str(batch_id),
        "started_at": "2025-01-31T12:00:00.123456+00:00",
    }


def test_a_finished_job_shows_when_it_finished() -> None:
    at = datetime(2025, 1, 31, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    view = job_view(job_record(JobStatus.CANCELLED, finished_at=at), InMemoryBlobStore(), timedelta(minutes=5))
    assert view["finished_at"] == "2025-01-31T13:00:00+01:00"  # isoformat, the offset as stored
    assert "result" not in view
    assert "error" not in view


@pytest.mark.parametrize(
    "progress", [{"fraction": 0.5}, {"stage": 3, "fraction": "half"}, {"stage": "x", "fraction": []}]
)
def test_a_malformed_progress_is_null_and_logged(progress: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    job = job_record(JobStatus.RUNNING, progress=progress)
    assert job_view(job, InMemoryBlobStore(), timedelta(minutes=5))["progress"] is None
    assert [getattr(r, "action", None) for r in caplog.records] == ["bad_progress"]


def test_the_view_model_is_what_the_body_says() -> None:
    job = job_record(JobStatus.FAILED, error_code="invalid_image", error_message="no NIR band", params=PARAMS)
    model = view_of(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert model.body() == job_view(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert JobView.model_validate(model.body()) == model
    assert model.result is None
    assert model.body()["error"] == {"code": "invalid_image", "message": "no NIR band"}


def test_a_summary_has_no_result_and_no_message() -> None:
    job = job_record(JobStatus.FAILED, error_code="timed_out", error_message="secret details", params=PARAMS)
    assert JobSummary.of(job).model_dump(mode="json") == {
        "job_id": str(job.job_id),
        "status": "failed",
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "analysis": "crop-health",
        "priority": "normal",
        "attempts": 1,
        "batch_id": None,
        "error_code": "timed_out",
    }


def test_a_succeeded_jobs_output_urls_are_signed_and_the_rest_passed_through() -> None:
    url = "memory://account/results/j/1/ndvi.tif"
    result = {"attempt": 1, "valid_fraction": 0.5, "outputs": {"ndvi_cog": url, "note": None}}
    job = job_record(JobStatus.SUCCEEDED, result=result, params=PARAMS)
    view = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert view["result"] == {
        "attempt": 1,
        "valid_fraction": 0.5,
        "outputs": {"ndvi_cog": f"{url}?se=300", "note": None},
    }
    assert "error" not in view


def test_an_unsignable_url_is_returned_unsigned() -> None:
    blobs = InMemoryBlobStore()
    blobs.failure = StorageUnavailable("user delegation key refused")
    url = "memory://account/results/j/1/ndvi.tif"
    job = job_record(JobStatus.SUCCEEDED, result={"outputs": {"ndvi_cog": url}})
    assert job_view(job, blobs, timedelta(minutes=5))["result"] == {"outputs": {"ndvi_cog": url}}


def test_a_failed_job_without_a_code_is_an_unknown_error() -> None:
    assert error_of(failed(None, None)) == {"code": "unknown_error", "message": GENERIC_MESSAGE}


@pytest.mark.parametrize("text", [str(JOB_ID), str(JOB_ID).upper()])
def test_parse_job_id_takes_the_canonical_form(text: str) -> None:
    assert str(parse_job_id(text)) == text.lower()


@pytest.mark.parametrize("text", ["nope", "", JOB_ID.hex, f"{{{JOB_ID}}}", f"urn:uuid:{JOB_ID}"])
def test_parse_job_id_refuses_other_forms(text: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_job_id(text)
    assert info.value.code == "invalid_job_id"
