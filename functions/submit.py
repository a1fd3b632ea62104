"""``POST /api/jobs``: a GeoTIFF in, 202 with the job's status URL out (:mod:`shared.submission` does the work).

Body: the GeoTIFF bytes (``image/tiff`` or ``application/octet-stream``; no Content-Type is taken as bytes too) or
``multipart/form-data`` with the file in field ``image`` and, optionally, GeoJSON field boundaries in field
``geometry`` (as the JSON body's ``geometry``). Query: ``bands``, ``scale``, ``analysis``, ``priority``,
``callback_url``, ``callback_events``. Or ``application/json``: the image by reference, ``{"upload_id"}`` (after
``POST /api/uploads``) or ``{"image_url"}``, with the same options as members (a query parameter fills in a member
left out) and ``geometry`` (:mod:`shared.by_reference`).
Header ``Idempotency-Key``: a new job answers 202; a replay of the same key with the same bytes answers 200 with the
same body (current status) and ``Idempotent-Replayed: true``; the same key with other bytes answers 409.
With ``MAX_BACKLOG`` jobs queued, a new job is refused: 429 ``backlog_full`` with ``Retry-After``.
"""

from __future__ import annotations

import functools
import json

import azure.functions as func

from functions import deps
from functions.http import form_parts, resource_url, submit_options
from functions.problems import guarded
from shared.by_reference import Found, find
from shared.geotiff import Limits
from shared.rejection import Rejected
from shared.submission import Accepted, ByReference, Policy, Submitted, Upload, submit

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
    if _media_type(req) == "application/json":
        s = d.settings
        limits = Limits(s.max_input_bytes, s.max_pixels, s.max_bands)
        finder = functools.partial(_find, store=d.blobs, limits=limits, allowed=s.allowed_image_hosts)
        request = by_reference(req, s.max_fields)
        outcome = submit(
            request, limits=limits, jobs=d.jobs, store=d.blobs, publisher=d.publisher, policy=policy(d), find=finder
        )
        return _accepted(req, outcome, s.retry_after_seconds)
    limits = Limits(d.settings.max_upload_bytes, d.settings.max_pixels, d.settings.max_bands)
    data, geometry = _image_bytes(req, limits.max_bytes)
    upload = Upload(data=data, geometry=geometry, max_fields=d.settings.max_fields, **submit_options(req))
    outcome = submit(upload, limits=limits, jobs=d.jobs, store=d.blobs, publisher=d.publisher, policy=policy(d))
    return _accepted(req, outcome, d.settings.retry_after_seconds)


def _find(request: ByReference, *, store: deps.BlobStoreLike, limits: Limits, allowed: tuple[str, ...]) -> Found:
    return find(request.upload_id, request.image_url, store, limits, allowed)


JSON_OPTIONS = ("bands", "scale", "analysis", "priority", "callback_url", "callback_events")


def by_reference(req: func.HttpRequest, max_fields: int) -> ByReference:
    """The JSON body of a submit by reference; a member left out is taken from the query, as for bytes."""
    try:
        body = json.loads(req.get_body() or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected("invalid_request_body", f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        detail = 'the body must be a JSON object: {"upload_id": ...} or {"image_url": ...}'
        raise Rejected("invalid_request_body", detail)
    unknown = sorted(set(body) - {"upload_id", "image_url", "geometry", *JSON_OPTIONS})
    if unknown:
        raise Rejected("invalid_request_body", f"unknown member(s): {', '.join(unknown)}")
    options = submit_options(req)
    for name in JSON_OPTIONS:
        if name in body:
            options[name] = _text(name, body[name])
    return ByReference(upload_id=body.get("upload_id"), image_url=body.get("image_url"),
                       geometry=body.get("geometry"), max_fields=max_fields, **options)  # fmt: skip


def _text(name: str, value: object) -> str | None:
    """A member as the query would carry it: lists of names comma-joined, numbers as text."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return str(value)
    raise Rejected("invalid_request_body", f"{name} must be a string (or a list of names / a number)")


def _media_type(req: func.HttpRequest) -> str:
    content_type: str = req.headers.get("Content-Type", "")
    return content_type.split(";", 1)[0].strip().lower()


def policy(d: deps.Deps) -> Policy:
    return Policy(
        max_backlog=d.settings.max_backlog,
        allow_private_callbacks=d.settings.webhook_allow_private,
        gauge=d.backlog,
        confirm=d.confirms.confirm if d.confirms is not None else None,
    )


def _image_bytes(req: func.HttpRequest, max_bytes: int) -> tuple[bytes, object]:
    """The image, and the form's parsed ``geometry`` (``None``: none, or not a form)."""
    body = req.get_body()
    if not body and "chunked" in req.headers.get("Transfer-Encoding", "").lower():
        raise Rejected("empty_body", CHUNKED_DETAIL)
    if len(body) > max_bytes:
        raise Rejected("payload_too_large", f"the body is {len(body)} bytes; the limit is {max_bytes}")
    media_type = _media_type(req)
    if media_type in RAW_TYPES:
        return body, None
    if media_type == "multipart/form-data":
        images, geometry = form_parts(req, "image")
        if not images:
            raise Rejected("missing_image_field", "the form has no file field named 'image'")
        return images[0], geometry
    raise Rejected(
        "unsupported_media_type",
        f"Content-Type {media_type!r} is not accepted: send image/tiff, application/octet-stream, "
        "multipart/form-data with the file in field 'image', or application/json with upload_id or image_url",
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
