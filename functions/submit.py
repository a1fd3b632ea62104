"""``POST /api/jobs``: a GeoTIFF in, 202 with the job's status URL out (:mod:`shared.submission` does the work).

Body: the GeoTIFF bytes (``image/tiff`` or ``application/octet-stream``; no Content-Type is taken as bytes too) or
``multipart/form-data`` with the file in field ``image``. Query: ``bands``, ``scale``, ``analysis``.
Header ``Idempotency-Key``: a new job answers 202; a replay of the same key with the same bytes answers 200 with the
same body (current status) and ``Idempotent-Replayed: true``; the same key with other bytes answers 409.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.geotiff import Limits
from shared.rejection import Rejected
from shared.submission import Submitted, Upload, submit

bp = func.Blueprint()  # type: ignore[no-untyped-call]

RAW_TYPES = frozenset({"", "image/tiff", "image/tif", "image/geotiff", "application/octet-stream"})


@bp.function_name("submit_job")
@bp.route(route="jobs", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def submit_job(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    limits = Limits(d.settings.max_upload_bytes, d.settings.max_pixels, d.settings.max_bands)
    upload = Upload(
        data=_image_bytes(req, limits.max_bytes),
        bands=req.params.get("bands"),
        scale=req.params.get("scale"),
        analysis=req.params.get("analysis"),
        idempotency_key=req.headers.get("Idempotency-Key"),
    )
    outcome = submit(upload, limits=limits, jobs=d.jobs, store=d.blobs, publisher=d.publisher)
    return _accepted(req, outcome, d.settings.retry_after_seconds)


def _image_bytes(req: func.HttpRequest, max_bytes: int) -> bytes:
    body = req.get_body()
    if len(body) > max_bytes:
        raise Rejected("payload_too_large", f"the body is {len(body)} bytes; the limit is {max_bytes}")
    media_type = req.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type in RAW_TYPES:
        return body
    if media_type == "multipart/form-data":
        return _form_image(req)
    raise Rejected(
        "unsupported_media_type",
        f"Content-Type {media_type!r} is not accepted: send image/tiff, application/octet-stream or "
        "multipart/form-data with the file in field 'image'",
    )


def _form_image(req: func.HttpRequest) -> bytes:
    try:
        files = req.files
    except ValueError as e:  # werkzeug: a boundary missing or malformed
        raise Rejected("invalid_multipart", f"the multipart body cannot be parsed: {e}") from e
    try:
        image = files.get("image")
        if image is None:
            raise Rejected("missing_image_field", "the form has no file field named 'image'")
        data: bytes = image.read()
        return data
    finally:
        for _, part in files.items(multi=True):
            part.close()  # large parts are spooled to temporary files


def _accepted(req: func.HttpRequest, outcome: Submitted, retry_after: int) -> func.HttpResponse:
    job = outcome.job
    url = urlsplit(req.url)
    location = f"{url.path.rstrip('/')}/{job.job_id}"
    status_url = f"{url.scheme}://{url.netloc}{location}" if url.netloc else location
    headers = {"Location": location}
    if not job.status.terminal:
        headers["Retry-After"] = str(retry_after)
    if not outcome.created:
        headers["Idempotent-Replayed"] = "true"
    body = {"job_id": str(job.job_id), "status": job.status.value, "status_url": status_url}
    return func.HttpResponse(
        json.dumps(body), status_code=202 if outcome.created else 200, headers=headers, mimetype="application/json"
    )
