"""RFC 9457 problem details (``application/problem+json``) with a stable ``code``, and the guard that makes every
failure one: a client's mistake is a 4xx, a backend that is down a 503 with ``Retry-After``, anything else a 500
whose details stay in the log. Never a stack trace in a response.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import azure.functions as func

from shared.errors import TransientError
from shared.jobs import IdempotencyConflict
from shared.rejection import Rejected

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/problem+json"

# code -> (HTTP status, title). Every code a response can carry is listed here.
PROBLEMS: dict[str, tuple[int, str]] = {
    "empty_body": (400, "Empty request body"),
    "not_a_tiff": (400, "Not a TIFF file"),
    "invalid_multipart": (400, "Malformed multipart body"),
    "missing_image_field": (400, "No image field in the form"),
    "invalid_scale": (400, "Invalid scale"),
    "invalid_analysis": (400, "Invalid analysis"),
    "invalid_idempotency_key": (400, "Invalid Idempotency-Key"),
    "invalid_job_id": (400, "Invalid job id"),
    "invalid_filter": (400, "Invalid filter"),
    "invalid_cursor": (400, "Invalid cursor"),
    "invalid_priority": (400, "Invalid priority"),
    "invalid_callback_url": (400, "Invalid callback URL"),
    "invalid_callback_events": (400, "Invalid callback events"),
    "invalid_batch_id": (400, "Invalid batch id"),
    "empty_batch": (400, "No image in the batch"),
    "invalid_request_body": (400, "Invalid JSON body"),
    "invalid_upload_id": (400, "Invalid upload id"),
    "invalid_image_url": (400, "Invalid image URL"),
    "image_url_not_allowed": (400, "Image URL not allowed"),
    "job_not_found": (404, "Job not found"),
    "batch_not_found": (404, "Batch not found"),
    "job_finished": (409, "The job is finished"),
    "not_retryable": (409, "The job cannot be retried"),
    "resubmit_required": (409, "Submit the image again"),
    "batch_too_large": (413, "Too many images in the batch"),
    "backlog_full": (429, "Too many jobs queued"),
    "idempotency_conflict": (409, "Idempotency-Key reused with another request"),
    "payload_too_large": (413, "Image too large"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "unreadable_image": (422, "Unreadable GeoTIFF"),
    "truncated_image": (422, "Truncated GeoTIFF"),
    "image_too_large": (422, "Too many pixels"),
    "too_many_bands": (422, "Too many bands"),
    "bands_required": (422, "Band names required"),
    "band_count_mismatch": (422, "Band names do not match the band count"),
    "invalid_bands": (422, "Invalid band names"),
    "missing_bands": (422, "Red and NIR bands required"),
    "no_valid_pixels": (422, "No valid pixels"),
    "upload_not_found": (422, "Upload not found"),
    "upload_expired": (422, "Upload too old"),
    "image_unreachable": (422, "Image unreachable"),
    "invalid_geometry": (422, "Invalid geometry"),
    "too_many_fields": (422, "Too many fields"),
    "geometry_outside_scene": (422, "Fields outside the image"),
    "internal_error": (500, "Internal error"),
}
SERVICE_UNAVAILABLE = (503, "Service temporarily unavailable")  # every TransientError code: enqueue_failed, ...
# What a 503 says, by code: fixed texts, never the error's own message (it names drivers, exceptions, hosts).
UNAVAILABLE_DETAILS = {
    "enqueue_failed": "the image could not be stored; submit it again (the same Idempotency-Key may be reused)",
    "database_unavailable": "the job database is unavailable at the moment; retry after the Retry-After delay",
    "storage_unavailable": "image storage is unavailable at the moment; retry after the Retry-After delay",
    "bus_unavailable": "the job queue is unavailable at the moment; retry after the Retry-After delay",
    "job_contended": "the job changed while the request ran; repeat the request",
}
UNAVAILABLE_DEFAULT = "the service is unavailable at the moment; retry after the Retry-After delay"

Handler = Callable[[func.HttpRequest], func.HttpResponse]


def problem(
    code: str, detail: str, *, status: int | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> func.HttpResponse:
    known_status, title = PROBLEMS.get(code, SERVICE_UNAVAILABLE)
    status = status or known_status
    body = {"type": f"urn:crop-ai:problem:{code}", "title": title, "status": status, "detail": detail, "code": code}
    return func.HttpResponse(
        json.dumps({**body, **extra}), status_code=status, headers=headers, mimetype=CONTENT_TYPE, charset="utf-8"
    )


def guarded(retry_after: Callable[[], int]) -> Callable[[Handler], Handler]:
    """Turn every exception a handler raises into a problem response (``retry_after`` gives the 503 header)."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(req: func.HttpRequest) -> func.HttpResponse:
            try:
                return handler(req)
            except Rejected as e:  # a 429 says when to come back
                too_many = PROBLEMS.get(e.code, SERVICE_UNAVAILABLE)[0] == 429
                return problem(e.code, e.detail, headers={"Retry-After": str(retry_after())} if too_many else None)
            except IdempotencyConflict as e:
                detail = (
                    "this Idempotency-Key was used for another image or other options (bands, scale, analysis,"
                    " geometry); use a new key for a new request"
                )
                return problem("idempotency_conflict", detail, job_id=str(e.existing.job_id))
            except TransientError as e:
                log.warning("%s: %s", e.code, e.message, extra={"action": "unavailable", "code": e.code})
                extra = {name: str(v) for name in ("job_id", "batch_id") if (v := getattr(e, name, None))}
                headers = {"Retry-After": str(retry_after())}
                detail = UNAVAILABLE_DETAILS.get(e.code, UNAVAILABLE_DEFAULT)
                return problem(e.code, detail, status=503, headers=headers, **extra)
            except Exception:
                log.exception("unhandled error in %s", handler.__name__, extra={"action": "internal_error"})
                return problem("internal_error", "an unexpected error occurred; it has been logged")

        return wrapper

    return decorate
