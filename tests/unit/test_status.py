"""The status view's error messages: only texts written for clients reach them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.jobs import Job, JobStatus
from shared.memory import InMemoryBlobStore
from shared.status import FIXED_MESSAGES, GENERIC_MESSAGE, job_view
from tests.jobs import job_record

INTERNAL = "retries exhausted after 5 deliveries; last error: KeyError: 'nir' (psycopg.OperationalError at 10.0.0.4)"


def failed(code: str, message: str | None) -> Job:
    return job_record(JobStatus.FAILED, attempts=5, error_code=code, error_message=message)


def error_of(job: Job) -> dict[str, str]:
    error: dict[str, str] = job_view(job, InMemoryBlobStore(), timedelta(minutes=5))["error"]
    return error


@pytest.mark.parametrize("code", ["invalid_image", "input_missing", "unknown_analysis", "invalid_message"])
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
