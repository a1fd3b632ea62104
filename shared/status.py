"""The status view of a job: what ``GET /api/jobs/{job_id}`` answers.

Output blob URLs in a succeeded job's ``result["outputs"]`` become short-lived read URLs (SAS where the account
allows); everything else in the stored result is passed through unchanged. A URL that cannot be signed right now
(storage unreachable, the user delegation key refused) is returned unsigned with a warning in the log: the job and
its result are still there, so the status answer must not turn into a 503.

A failed job's ``error.message`` is the stored text only for codes whose messages are written for the client (a
permanent problem with the job's own input); ``enqueue_failed`` gets a fixed text, and every other code (retries
exhausted, dead-lettered by the broker, internal errors) a generic one, since the stored text may carry exception
names and SDK details. The full text stays in the database and the logs.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

from shared.errors import StorageUnavailable
from shared.jobs import Job, JobStatus
from shared.rejection import Rejected

log = logging.getLogger(__name__)

CLIENT_MESSAGE_CODES = frozenset({"invalid_image", "input_missing", "unknown_analysis", "invalid_message", "timed_out"})
FIXED_MESSAGES = {
    "enqueue_failed": "the job could not be queued; submit the image again (the same Idempotency-Key may be reused)",
}
GENERIC_MESSAGE = "the job could not be processed because of an internal error; it has been logged"


class UrlSigner(Protocol):
    def read_url(self, blob_url: str, ttl: timedelta) -> str: ...


def parse_job_id(text: str) -> UUID:
    """A job id as it appears in a URL: the canonical hyphenated UUID form only."""
    try:
        job_id = UUID(text)
    except ValueError:
        job_id = None
    if job_id is None or str(job_id) != text.lower():
        raise Rejected("invalid_job_id", f"{text[:64]!r} is not a job id (a UUID such as {UUID(int=0)})")
    return job_id


def job_view(job: Job, signer: UrlSigner, ttl: timedelta) -> dict[str, Any]:
    view: dict[str, Any] = {
        "job_id": str(job.job_id),
        "status": job.status.value,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "attempts": job.attempts,
        "analysis": job.params.get("analysis"),
    }
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        view["result"] = _with_read_urls(job, job.result, signer, ttl)
    if job.status is JobStatus.FAILED:
        code = job.error_code or "unknown_error"
        view["error"] = {"code": code, "message": client_message(code, job.error_message)}
    return view


def client_message(code: str, stored: str | None) -> str:
    """What a client may read about a failure with ``code`` (``stored``: the full text in the database)."""
    if code in CLIENT_MESSAGE_CODES and stored:
        return stored
    return FIXED_MESSAGES.get(code, GENERIC_MESSAGE)


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
