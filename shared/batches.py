"""Batches: several images submitted in one request, recorded all or none, and their combined status.

:func:`submit_batch` follows :func:`shared.submission.submit`, for ``n`` images at once:

1. The options (priority, callback) and then every image are validated; the first refusal raises
   :class:`ImageRejected` (with the image's ``index``) and nothing is stored.
2. Admission control counts the whole batch (``backlog + n > max_backlog``: ``backlog_full``); a replay of the
   batch's ``Idempotency-Key`` is not refused.
3. ``create_batch`` inserts every job (with its place in the request), in one transaction, the batch *unsealed*, or,
   for a known key, returns that batch's jobs. A replay must carry the same images (matched by SHA-256, in any
   order), else :class:`BatchConflict`.
4. Every image is uploaded (a few at a time). If any upload fails, the whole batch is aborted (``abort_batch``: every
   queued job failed ``enqueue_failed``) and :class:`BatchEnqueueFailed` (503) is raised.
5. The batch is *sealed* (``seal_batch``): only now may its jobs be sent. The seal is refused if a job of the batch
   was aborted meanwhile, or is queued with an image this request did not store (a concurrent replay's); then the
   batch is aborted and :class:`BatchEnqueueFailed` raised.
6. Each job's message is handed over (:func:`shared.submission.hand_over`: an ambiguous send is the reconciler's).

All or none: nothing of an unsealed batch is ever sent (the reconciler skips its jobs, and aborts the whole batch if
its submit died: :mod:`shared.reconciler`), so either every job is sent, once every image is stored, or every job
ends ``enqueue_failed``, and a same-key replay resubmits all of them. A replay hands over again what a submit would:
jobs failed ``enqueue_failed`` are resubmitted, and queued jobs whose send was never confirmed are stored and sent
again (the same message id). Every job of a batch shares one webhook secret.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal, NoReturn
from uuid import UUID

from pydantic import BaseModel, Field

from shared import metrics
from shared.errors import StorageUnavailable, TransientError
from shared.fields import Fields, parse_fields
from shared.geotiff import Limits
from shared.jobs import Job, JobStatus, JobStore, NewJob
from shared.rejection import Rejected
from shared.submission import (
    DEFAULT_ANALYSIS,
    EnqueueFailed,
    Image,
    InputStore,
    Options,
    Policy,
    Publisher,
    admit,
    callback_target,
    hand_over,
    idempotency_key,
    input_blob_name,
    new_callback,
    priority,
    stored_secret,
    validate_image,
)

log = logging.getLogger(__name__)

UPLOADS = 8  # images uploaded at once


class ImageRejected(Rejected):
    """Image ``index`` (0-based, in the request's order) was refused; nothing was stored."""

    def __init__(self, index: int, rejected: Rejected) -> None:
        super().__init__(rejected.code, f"image {index}: {rejected.detail}")
        self.index = index


class BatchConflict(Exception):
    """The batch's Idempotency-Key was used before for other images."""

    def __init__(self, batch_id: UUID) -> None:
        super().__init__(f"idempotency key already used for batch {batch_id} with other images")
        self.batch_id = batch_id


class BatchEnqueueFailed(TransientError):
    """An image of the batch could not be stored, or the batch was aborted meanwhile; its jobs were failed (unless a
    concurrent same-key request sealed the batch first) and the batch may be submitted again."""

    code = EnqueueFailed.code

    def __init__(self, batch_id: UUID, message: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id


@dataclass(frozen=True)
class BatchUpload(Options):
    """The images of a batch, with the options for every one of them; ``geometry``: one set of fields for every
    image, parsed once, checked against each image's footprint (``geometry_outside_scene`` names the image's index)."""

    images: list[bytes]


@dataclass(frozen=True)
class SubmittedBatch:
    batch_id: UUID
    jobs: list[Job]  # in the order of the request's images
    created: bool  # False: an Idempotency-Key replay
    webhook_secret: str | None = None


class BatchJob(BaseModel):
    job_id: UUID
    status: JobStatus
    status_url: str


class BatchAccepted(BaseModel):
    """The body of ``POST /api/batches``: 202 for a new batch, 200 for an ``Idempotency-Key`` replay."""

    batch_id: UUID
    status_url: str = Field(description="GET it for the batch's status (also the Location header)")
    jobs: list[BatchJob] = Field(description="one per image, in the request's order")
    webhook_secret: str | None = Field(None, description="signs the webhooks of every job of the batch")


class BatchJobView(BaseModel):
    job_id: UUID
    status: JobStatus
    error_code: str | None


class BatchView(BaseModel):
    """The body of ``GET /api/batches/{batch_id}``."""

    batch_id: UUID
    size: int
    status: Literal["queued", "running", "completed"] = Field(
        description="completed: every job is terminal; queued: every job is queued; running otherwise"
    )
    counts: dict[JobStatus, int] = Field(description="jobs by status (every status, zeros included)")
    jobs: list[BatchJobView]


def parse_batch_id(text: str) -> UUID:
    try:
        batch_id = UUID(text)
    except ValueError:
        batch_id = None
    if batch_id is None or str(batch_id) != text.lower():
        raise Rejected("invalid_batch_id", f"{text[:64]!r} is not a batch id (a UUID such as {UUID(int=0)})")
    return batch_id


def batch_view(batch_id: UUID, jobs: list[Job]) -> BatchView:
    counts = dict.fromkeys(JobStatus, 0)
    for job in jobs:
        counts[job.status] += 1
    if all(job.status.terminal for job in jobs):
        status: Literal["queued", "running", "completed"] = "completed"
    elif counts[JobStatus.QUEUED] == len(jobs):
        status = "queued"
    else:
        status = "running"
    views = [BatchJobView(job_id=j.job_id, status=j.status, error_code=j.error_code) for j in jobs]
    return BatchView(batch_id=batch_id, size=len(jobs), status=status, counts=counts, jobs=views)


def submit_batch(
    upload: BatchUpload,
    *,
    limits: Limits,
    max_size: int,
    jobs: JobStore,
    store: InputStore,
    publisher: Publisher,
    policy: Policy,
) -> SubmittedBatch:
    key = idempotency_key(upload.idempotency_key)
    if not upload.images:
        raise Rejected("empty_batch", "the form has no file in field 'image': send 1 or more images")
    if len(upload.images) > max_size:
        raise Rejected("batch_too_large", f"{len(upload.images)} images; a batch holds at most {max_size}")
    chosen = priority(upload.priority)
    target = callback_target(upload.callback_url, upload.callback_events, policy.allow_private_callbacks)
    fields = None if upload.geometry is None else parse_fields(upload.geometry, upload.max_fields)
    images = [_validated(i, data, limits, upload, fields) for i, data in enumerate(upload.images)]
    admit(jobs, len(images), policy, lambda: key is not None and jobs.batch_by_key(key) is not None)
    callback = new_callback(target)
    new = []
    for image in images:
        job_id = uuid.uuid4()
        new.append(
            NewJob(
                job_id=job_id,
                input_blob=input_blob_name(job_id),
                input_sha256=image.sha256,
                params=image.params,
                priority=chosen,
                callback=callback,
            )
        )
    stored, created = jobs.create_batch(uuid.uuid4(), new, key)
    batch_id = stored[0].batch_id
    assert batch_id is not None, "a batch's jobs name it"
    if created:
        ordered, pending = stored, {job.job_id for job in stored}
    else:
        ordered, pending = _healed(_matched(batch_id, stored, images), jobs)
    uploads = [(job, image) for job, image in zip(ordered, images, strict=True) if job.job_id in pending]
    _store_all(batch_id, uploads, jobs, store)
    if not jobs.seal_batch(batch_id, pending):
        _abort(jobs, batch_id, "the batch was aborted while it was submitted")
    final = [hand_over(job, jobs, publisher, policy.confirm) if job.job_id in pending else job for job in ordered]
    if created:
        for job in final:
            metrics.job_submitted(str(job.params.get("analysis", DEFAULT_ANALYSIS)), job.priority)
    action = "submit" if created else "replay"
    extra = {"batch_id": str(batch_id), "action": f"batch_{action}", "count": len(final)}
    log.info("batch %s accepted (%d jobs, %s)", batch_id, len(final), action, extra=extra)
    secret = callback.secret if created and callback else stored_secret(jobs, final[0])
    return SubmittedBatch(batch_id=batch_id, jobs=final, created=created, webhook_secret=secret)


def _validated(index: int, data: bytes, limits: Limits, upload: BatchUpload, fields: Fields | None) -> Image:
    try:
        return validate_image(data, limits, upload.bands, upload.scale, upload.analysis, fields)
    except Rejected as e:
        raise ImageRejected(index, e) from e


def _matched(batch_id: UUID, stored: list[Job], images: list[Image]) -> list[Job]:
    """The stored jobs in the order of the replay's images (matched by SHA-256), or :class:`BatchConflict`."""
    if sorted(job.input_sha256 for job in stored) != sorted(image.sha256 for image in images):
        raise BatchConflict(batch_id)
    by_sha: dict[str, list[Job]] = defaultdict(list)
    for job in stored:
        by_sha[job.input_sha256].append(job)
    return [by_sha[image.sha256].pop() for image in images]


def _healed(replayed: list[Job], jobs: JobStore) -> tuple[list[Job], set[UUID]]:
    """A replay, as a submit's replay treats each job: ``(jobs, pending)``. Jobs failed ``enqueue_failed`` are
    resubmitted; ``pending``: the queued jobs whose send is unconfirmed (the resubmitted ones too), whose image and
    message go out again. Of an unsealed batch that is every queued job: nothing of it was sent."""
    ordered, pending = [], set()
    for job in replayed:
        if job.status is JobStatus.FAILED and job.error_code == EnqueueFailed.code:
            job = jobs.resubmit(job.job_id) or jobs.get(job.job_id) or job  # lost a race: as the winner left it
        if job.status is JobStatus.QUEUED and job.sent_at is None:
            pending.add(job.job_id)
        ordered.append(job)
    return ordered, pending


def _store_all(batch_id: UUID, pairs: list[tuple[Job, Image]], jobs: JobStore, store: InputStore) -> None:
    """Upload every image; if one fails, abort the batch (every queued job ``enqueue_failed``) and raise."""
    if not pairs:
        return
    with ThreadPoolExecutor(max_workers=min(UPLOADS, len(pairs)), thread_name_prefix="batch-upload") as pool:
        futures = [pool.submit(store.put_input, job.job_id, image.data, job.input_sha256) for job, image in pairs]
        _, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for future in not_done:
            future.cancel()
    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
    unavailable = [e for e in errors if isinstance(e, StorageUnavailable)]
    if len(unavailable) < len(errors):
        raise next(e for e in errors if not isinstance(e, StorageUnavailable))
    if not unavailable:
        return
    _abort(jobs, batch_id, f"could not store an image of the batch: {unavailable[0].message}")


def _abort(jobs: JobStore, batch_id: UUID, why: str) -> NoReturn:
    """Abort the batch (nothing happens once it is sealed: then it goes ahead as it is) and raise."""
    aborted = jobs.abort_batch(batch_id, why)
    extra = {"batch_id": str(batch_id), "action": "batch_enqueue_failed", "count": len(aborted)}
    log.error("batch %s: %s (%d jobs failed)", batch_id, why, len(aborted), extra=extra)
    raise BatchEnqueueFailed(batch_id, "the batch could not be stored whole; submit the batch again")
