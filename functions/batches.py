"""``POST /api/batches`` (several GeoTIFFs, all or none) and ``GET /api/batches/{batch_id}``: :mod:`shared.batches`
does the work.

``POST``: ``multipart/form-data`` with one file per ``image`` field (1 to ``MAX_BATCH_SIZE``) and, optionally, one
``geometry`` part (GeoJSON field boundaries for every image); the query of ``POST /api/jobs`` applies to every
image, the ``Idempotency-Key`` header to the batch. 202 with every job's status URL
(200 and ``Idempotent-Replayed: true`` for a replay); a refused image answers its problem with its ``index``; a
failed upload fails every job of the batch (503 ``enqueue_failed``, ``batch_id``): nothing of a batch is sent before
every image is stored. ``GET``: the batch's status and its jobs in the request's order.
"""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.http import form_parts, resource_url, submit_options
from functions.problems import guarded, problem
from functions.submit import policy
from shared.batches import (
    BatchAccepted,
    BatchConflict,
    BatchJob,
    BatchUpload,
    ImageRejected,
    SubmittedBatch,
    batch_view,
    parse_batch_id,
    submit_batch,
)
from shared.geotiff import Limits
from shared.rejection import Rejected

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("submit_batch")
@bp.route(route="batches", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def submit_batch_job(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    limits = Limits(d.settings.max_upload_bytes, d.settings.max_pixels, d.settings.max_bands)
    images, geometry = _images(req, limits.max_bytes * d.settings.max_batch_size)
    upload = BatchUpload(images=images, geometry=geometry, max_fields=d.settings.max_fields, **submit_options(req))
    try:
        outcome = submit_batch(
            upload,
            limits=limits,
            max_size=d.settings.max_batch_size,
            jobs=d.jobs,
            store=d.blobs,
            publisher=d.publisher,
            policy=policy(d),
        )
    except ImageRejected as e:
        return problem(e.code, e.detail, index=e.index)
    except BatchConflict as e:
        detail = "this Idempotency-Key was used for other images; use a new key for a new batch"
        return problem("idempotency_conflict", detail, batch_id=str(e.batch_id))
    return _accepted(req, outcome, d.settings.retry_after_seconds)


@bp.function_name("batch_status")
@bp.route(route="batches/{batch_id}", methods=[func.HttpMethod.GET])
@guarded(deps.retry_after)
def batch_status(req: func.HttpRequest) -> func.HttpResponse:
    batch_id = parse_batch_id(req.route_params.get("batch_id", ""))
    d = deps.get()
    jobs = d.jobs.batch_jobs(batch_id)
    if jobs is None:
        return problem("batch_not_found", f"there is no batch {batch_id}")
    view = batch_view(batch_id, jobs)
    headers = {"Cache-Control": "no-store"}
    if view.status != "completed":
        headers["Retry-After"] = str(d.settings.retry_after_seconds)
    body = json.dumps(view.model_dump(mode="json"))
    return func.HttpResponse(body, status_code=200, headers=headers, mimetype="application/json")


def _images(req: func.HttpRequest, max_bytes: int) -> tuple[list[bytes], object]:
    body = req.get_body()
    if len(body) > max_bytes:
        raise Rejected("payload_too_large", f"the body is {len(body)} bytes; the limit is {max_bytes}")
    media_type = req.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        raise Rejected(
            "unsupported_media_type",
            f"Content-Type {media_type!r} is not accepted: send multipart/form-data with one file per 'image' field",
        )
    return form_parts(req, "image")


def _accepted(req: func.HttpRequest, outcome: SubmittedBatch, retry_after: int) -> func.HttpResponse:
    location, status_url = resource_url(req, f"batches/{outcome.batch_id}")
    jobs = [BatchJob(job_id=j.job_id, status=j.status, status_url=resource_url(req, f"jobs/{j.job_id}")[1])
            for j in outcome.jobs]  # fmt: skip
    headers = {"Location": location}
    if not all(job.status.terminal for job in outcome.jobs):
        headers["Retry-After"] = str(retry_after)
    if not outcome.created:
        headers["Idempotent-Replayed"] = "true"
    body = BatchAccepted(
        batch_id=outcome.batch_id, status_url=status_url, jobs=jobs, webhook_secret=outcome.webhook_secret
    )
    return func.HttpResponse(
        json.dumps(body.model_dump(mode="json", exclude_none=True)),
        status_code=202 if outcome.created else 200,
        headers=headers,
        mimetype="application/json",
    )
