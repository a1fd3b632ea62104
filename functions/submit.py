"""``POST /api/jobs``: a GeoTIFF in, 202 with the job's status URL out (:mod:`shared.submission` does the work).

Body: the GeoTIFF bytes (``image/tiff`` or ``application/octet-stream``; no Content-Type is taken as bytes too) or
``multipart/form-data`` with the file in field ``image``. Query: ``bands``, ``scale``, ``analysis``, ``priority``,
``callback_url``, ``callback_events``.
Header ``Idempotency-Key``: a new job answers 202; a replay of the same key with the same bytes answers 200 with the
same body (current status) and ``Idempotent-Replayed: true``; the same key with other bytes answers 409.
With ``MAX_BACKLOG`` jobs queued, a new job is refused: 429 ``backlog_full`` with ``Retry-After``.
"""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.http import form_files, resource_url, submit_options
from functions.problems import guarded
from shared.geotiff import Limits
from shared.rejection import Rejected
from shared.submission import Accepted, Policy, Submitted, Upload, submit

bp = func.Blueprint()  # type: ignore[no-untyped-call]

RAW_TYPES = frozenset({"", "image/tiff", "image/tif", "image/geotiff", "application/octet-stream"})
# The Functions host does not pass a chunked body to the app (azure-functions-host#7930): it arrives empty.
CHUNKED_DETAIL = (
    "the body was sent with Transfer-Encoding: chunked, which the Functions host does not pass on: "
    "send the image with a Content-Length header"
)


@bp.function_name("submit_job")
@bp.route(route="jobs", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def submit_job(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    limits = Limits(d.settings.max_upload_bytes, d.settings.max_pixels, d.settings.max_bands)
    upload = Upload(data=_image_bytes(req, limits.max_bytes), **submit_options(req))
    outcome = submit(upload, limits=limits, jobs=d.jobs, store=d.blobs, publisher=d.publisher, policy=policy(d))
    return _accepted(req, outcome, d.settings.retry_after_seconds)


def policy(d: deps.Deps) -> Policy:
    return Policy(
        max_backlog=d.settings.max_backlog, allow_private_callbacks=d.settings.webhook_allow_private, gauge=d.backlog
    )


def _image_bytes(req: func.HttpRequest, max_bytes: int) -> bytes:
    body = req.get_body()
    if not body and "chunked" in req.headers.get("Transfer-Encoding", "").lower():
        raise Rejected("empty_body", CHUNKED_DETAIL)
    if len(body) > max_bytes:
        raise Rejected("payload_too_large", f"the body is {len(body)} bytes; the limit is {max_bytes}")
    media_type = req.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type in RAW_TYPES:
        return body
    if media_type == "multipart/form-data":
        images = form_files(req, "image")
        if not images:
            raise Rejected("missing_image_field", "the form has no file field named 'image'")
        return images[0]
    raise Rejected(
        "unsupported_media_type",
        f"Content-Type {media_type!r} is not accepted: send image/tiff, application/octet-stream or "
        "multipart/form-data with the file in field 'image'",
    )


def _accepted(req: func.HttpRequest, outcome: Submitted, retry_after: int) -> func.HttpResponse:
    job = outcome.job
    location, status_url = resource_url(req, f"jobs/{job.job_id}")
    headers = {"Location": location}
    if not job.status.terminal:
        headers["Retry-After"] = str(retry_after)
    if not outcome.created:
        headers["Idempotent-Replayed"] = "true"
    body = Accepted(
        job_id=job.job_id,
        status=job.status,
        status_url=status_url,
        priority=job.priority,
        webhook_secret=outcome.webhook_secret,
    )
    return func.HttpResponse(
        json.dumps(body.model_dump(mode="json", exclude_none=True)),
        status_code=202 if outcome.created else 200,
        headers=headers,
        mimetype="application/json",
    )
