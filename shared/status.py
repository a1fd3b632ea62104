"""What the API says about jobs: :class:`JobView` (``GET /api/jobs/{job_id}``) and :class:`JobSummary` /
:class:`JobPage` (a job's line in ``GET /api/jobs``, and one page of them).

Output blob URLs in a succeeded job's ``result["outputs"]`` become short-lived read URLs (SAS where the account
allows); everything else in the stored result is passed through unchanged. A URL that cannot be signed right now
(storage unreachable, the user delegation key refused) is returned unsigned with a warning in the log: the job and
its result are still there, so the status answer must not turn into a 503.

A failed job's ``error.message`` is the stored text only for codes whose messages are written for the client (a
permanent problem with the job's own input); ``enqueue_failed`` gets a fixed text, and every other code (retries
exhausted, dead-lettered by the broker, internal errors) a generic one, since the stored text may carry exception
names and SDK details. The full text stays in the database and the logs.

Timestamps are written as Python's ``isoformat()`` (``2025-01-31T12:00:00.123456+00:00``), as they always were.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, PlainSerializer, ValidationError, WithJsonSchema

from shared.errors import StorageUnavailable
from shared.jobs import Job, JobStatus, Priority
from shared.rejection import Rejected

log = logging.getLogger(__name__)

CLIENT_MESSAGE_CODES = frozenset(
    {
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
    }
)
FIXED_MESSAGES = {
    "enqueue_failed": "the job could not be queued; submit the image again (the same Idempotency-Key may be reused)",
}
GENERIC_MESSAGE = "the job could not be processed because of an internal error; it has been logged"

Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda d: d.isoformat(), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class UrlSigner(Protocol):
    def read_url(self, blob_url: str, ttl: timedelta) -> str: ...


class Progress(BaseModel):
    """The running (or last) attempt's progress, as the worker reports it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    stage: str
    fraction: float | None
    updated_at: Timestamp | None


class JobError(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class WebhookSummary(BaseModel):
    """A job's webhook deliveries (``shared.events.EventStore.summary``): ``deliveries`` events, ``attempts`` POSTs in
    all, the last response's status (``null``: no response), and how many events were ``delivered``, are ``pending``
    or were given up (``gave_up``). ``url`` is the callback's ``scheme://host[:port]`` only."""

    model_config = ConfigDict(frozen=True)

    url: str
    events: list[str]
    deliveries: int
    attempts: int
    last_status: int | None
    last_attempt_at: Timestamp | None
    delivered: int
    pending: int
    gave_up: int


class JobView(BaseModel):
    """``GET /api/jobs/{job_id}``. ``result`` is there only when the job succeeded and ``error`` only when it failed
    (:meth:`body` leaves them out otherwise); every other field is always there, ``null`` when it does not apply."""

    model_config = ConfigDict(frozen=True)
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"result", "error", "webhook"})  # absent (not null) when None

    job_id: UUID
    status: JobStatus
    created_at: Timestamp
    updated_at: Timestamp
    attempts: int
    analysis: str | None
    priority: Priority
    progress: Progress | None
    cancel_requested: bool  # a running job's cancellation was requested (it stops at its next checkpoint)
    retries: int  # manual retries (POST /api/jobs/{id}/retry)
    batch_id: UUID | None
    started_at: Timestamp | None  # the last attempt's start
    finished_at: Timestamp | None
    result: dict[str, Any] | None = None
    error: JobError | None = None
    webhook: WebhookSummary | None = None  # a job with a callback_url

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        return self.model_dump(mode="json", exclude={name for name in self.OPTIONAL if getattr(self, name) is None})


class JobSummary(BaseModel):
    """A job's line in ``GET /api/jobs``: no result, no error text (``error_code`` only)."""

    model_config = ConfigDict(frozen=True)

    job_id: UUID
    status: JobStatus
    created_at: Timestamp
    updated_at: Timestamp
    analysis: str | None
    priority: Priority
    attempts: int
    batch_id: UUID | None
    error_code: str | None

    @classmethod
    def of(cls, job: Job) -> JobSummary:
        return cls(
            job_id=job.job_id,
            status=job.status,
            created_at=job.created_at,
            updated_at=job.updated_at,
            analysis=job.params.get("analysis"),
            priority=job.priority,
            attempts=job.attempts,
            batch_id=job.batch_id,
            error_code=job.error_code,
        )


class JobPage(BaseModel):
    """``GET /api/jobs``: newest first; ``next`` is the cursor of the following page (``null``: the last page)."""

    model_config = ConfigDict(frozen=True)

    jobs: list[JobSummary]
    next: str | None


def parse_job_id(text: str) -> UUID:
    """A job id as it appears in a URL: the canonical hyphenated UUID form only."""
    try:
        job_id = UUID(text)
    except ValueError:
        job_id = None
    if job_id is None or str(job_id) != text.lower():
        raise Rejected("invalid_job_id", f"{text[:64]!r} is not a job id (a UUID such as {UUID(int=0)})")
    return job_id


def job_view(job: Job, signer: UrlSigner, ttl: timedelta, webhook: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of ``GET /api/jobs/{job_id}`` (:class:`JobView`); ``webhook``: the job's webhook summary."""
    return view_of(job, signer, ttl, webhook).body()


def view_of(job: Job, signer: UrlSigner, ttl: timedelta, webhook: dict[str, Any] | None = None) -> JobView:
    result = None
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        result = _with_read_urls(job, job.result, signer, ttl)
    error = None
    if job.status is JobStatus.FAILED:
        code = job.error_code or "unknown_error"
        error = JobError(code=code, message=client_message(code, job.error_message))
    return JobView(
        job_id=job.job_id,
        status=job.status,
        created_at=job.created_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
        analysis=job.params.get("analysis"),
        priority=job.priority,
        progress=_progress(job),
        cancel_requested=job.cancel_requested_at is not None,
        retries=job.retries,
        batch_id=job.batch_id,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result=result,
        error=error,
        webhook=WebhookSummary.model_validate(webhook) if webhook is not None else None,
    )


def client_message(code: str, stored: str | None) -> str:
    """What a client may read about a failure with ``code`` (``stored``: the full text in the database)."""
    if code in CLIENT_MESSAGE_CODES and stored:
        return stored
    return FIXED_MESSAGES.get(code, GENERIC_MESSAGE)


def _progress(job: Job) -> Progress | None:
    """The stored progress; a malformed one (a worker's bug) is logged and shown as ``null``, not a 500."""
    if job.progress is None:
        return None
    try:
        return Progress.model_validate(job.progress)
    except ValidationError as e:
        extra = {"job_id": str(job.job_id), "action": "bad_progress"}
        log.warning("job %s: malformed progress %r: %s", job.job_id, job.progress, e, extra=extra)
        return None


def _with_read_urls(job: Job, result: dict[str, Any], signer: UrlSigner, ttl: timedelta) -> dict[str, Any]:
    outputs = result.get("outputs")
    if not isinstance(outputs, dict):
        return result
    signed = {key: _read_url(job, url, signer, ttl) if isinstance(url, str) else url for key, url in outputs.items()}
    return {**result, "outputs": signed}


def _read_url(job: Job, url: str, signer: UrlSigner, ttl: timedelta) -> str:
    try:
        return signer.read_url(url, ttl)
    except StorageUnavailable as e:
        extra = {"job_id": str(job.job_id), "action": "sign_url_failed"}
        log.warning("job %s: cannot sign %s, returning it unsigned: %s", job.job_id, url, e.message, extra=extra)
        return url
