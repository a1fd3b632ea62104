"""The status view: its fields, signed output URLs, and error messages (only texts written for clients)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from shared.errors import StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.rejection import Rejected
from shared.status import FIXED_MESSAGES, GENERIC_MESSAGE, job_view, parse_job_id
from tests.fakes import InMemoryBlobStore
from tests.jobs import PARAMS, job_record

JOB_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
INTERNAL = "retries exhausted after 5 deliveries; last error: KeyError: 'nir' (psycopg.OperationalError at 10.0.0.4)"


def failed(code: str | None, message: str | None) -> Job:
    return job_record(JobStatus.FAILED, attempts=5, error_code=code, error_message=message)


def error_of(job: Job) -> dict[str, str]:
    error: dict[str, str] = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))["error"]
    return error


@pytest.mark.parametrize("code", ["invalid_image", "input_missing", "unknown_analysis", "invalid_message", "timed_out"])
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


def test_a_running_job_shows_its_attempt_and_nothing_else() -> None:
    job = job_record(JobStatus.RUNNING, attempts=2, params=PARAMS)
    view = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))
    assert view == {
        "job_id": str(job.job_id),
        "status": "running",
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "attempts": 2,
        "analysis": "crop-health",
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
