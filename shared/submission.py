"""The submit use case: validate an upload cheaply, record the job, store the image, hand the message to the bus.

The job's row is the outbox: once it is inserted the job exists, and either this request or the reconciler
(:mod:`shared.reconciler`) hands it over to the bus. Order and failure semantics:

1. Everything about the request is validated first (:func:`shared.geotiff.inspect`, bands, scale, analysis); a
   refusal raises :class:`~shared.rejection.Rejected` and nothing is stored.
2. The job row is inserted (``queued``, generation 1, send not confirmed) *before* the image is uploaded: an
   ``Idempotency-Key`` replay or conflict is known at this point, so a replay never uploads a stray blob.
3. The image goes to ``images/{job_id}/input.tif``. If that fails, no message can have been sent, so the job is
   failed with ``enqueue_failed`` (``abort_submit``) and :class:`EnqueueFailed` (transient: 503 with
   ``Retry-After``) is raised; a retry with the same ``Idempotency-Key`` resubmits the same job.
4. The message ``{job_id}:1`` is sent, then the send is confirmed on the row (``confirm_sent``; the API does it
   behind its answer, :mod:`shared.confirmations`: a confirm that never lands is a reconciler's resend). A send that
   fails is *ambiguous* (it may have reached the broker): the job stays ``queued`` and claimable, the answer is still
   202, and the reconciler sends a new generation if no worker has claimed the job after ``RECONCILE_RESEND_AFTER``.
   A delivered message of either generation claims the job; the other finds it claimed and is dropped.
5. A process that dies anywhere after 2 leaves a ``queued`` job with an unconfirmed send: the reconciler again.

``Idempotency-Key``: same key + same bytes returns the existing job (``created=False``, the API answers 200):

* ``queued`` with its send unconfirmed: the image and the *same* message are sent again (a retry of the same send:
  duplicate detection drops it if the first one arrived);
* ``failed`` with ``enqueue_failed``: ``resubmit`` sets it back to ``queued`` with a new generation (a conditional
  update: of two concurrent retries one wins) and this request hands it over as in 3 and 4;
* any other state: the job as it is, nothing is sent.

Same key + other bytes raises :class:`~shared.jobs.IdempotencyConflict`.

Options: ``priority`` (``high`` | ``normal``) picks the queue; ``callback_url`` / ``callback_events`` register a
webhook (:func:`shared.webhooks.validate_callback`), signed with a fresh secret that only the submit's answer (and a
replay's) returns. Admission control (:func:`admit`): with ``max_backlog`` queued jobs or more, a new submit is
refused (``backlog_full``, 429) before anything is stored; a replay of an existing ``Idempotency-Key`` is not. The
bound is soft: concurrent submits may each see room for one more.

:func:`hand_over` (send, then confirm) is the outbox hand-over every new generation goes through: a submit, a
batch, a manual retry (:mod:`shared.control`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from opentelemetry import trace
from pydantic import BaseModel, Field

from shared import metrics
from shared.bands import BandError, parse_names, resolve
from shared.by_reference import Found
from shared.confirmations import Confirm, confirm_now
from shared.errors import BusUnavailable, StorageUnavailable, TransientError
from shared.fields import Fields, check_intersects, parse_fields
from shared.geotiff import ImageHeader, Limits, inspect
from shared.inputs import reference_blob_name
from shared.jobs import PRIORITIES, Callback, Job, JobStatus, JobStore, Priority
from shared.messages import JobMessage
from shared.rejection import Rejected
from shared.webhooks import new_secret, validate_callback

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_ANALYSIS = "crop-health"
_ANALYSIS = re.compile(r"^(crop-health|model:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as an HTTP header value can carry


class InputStore(Protocol):
    def put_input(self, job_id: UUID, data: bytes, sha256: str, *, name: str | None = None) -> str: ...


class Publisher(Protocol):
    def send(self, message: JobMessage, *, at: datetime | None = None) -> None: ...


class EnqueueFailed(TransientError):
    """The image could not be stored; the job was failed (``enqueue_failed``) and may be submitted again."""

    code = "enqueue_failed"

    def __init__(self, job_id: UUID, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


@dataclass(frozen=True, kw_only=True)
class Options:
    """What a submit says besides its image: the query values (or JSON members) as received, and ``geometry``
    (GeoJSON field boundaries, parsed JSON) checked against the image (:func:`fields_params`)."""

    geometry: object = None
    max_fields: int = 100  # MAX_FIELDS
    bands: str | None = None
    scale: str | None = None
    analysis: str | None = None
    idempotency_key: str | None = None
    priority: str | None = None
    callback_url: str | None = None
    callback_events: str | None = None


@dataclass(frozen=True)
class Upload(Options):
    """A submit with the image in the request (the body, or the form's image part; ``geometry``: its ``geometry``
    part)."""

    data: bytes


@dataclass(frozen=True)
class ByReference(Options):
    """A JSON submit: the image by ``upload_id`` or ``image_url`` (:mod:`shared.by_reference`)."""

    upload_id: object = None
    image_url: object = None


class BacklogGauge:
    """The queued-jobs count admission control compares with ``max_backlog``, without a ``count(*)`` per submit.

    While the last count, plus every job admitted since, plus the new ones, stays within half the limit, and the
    count is at most ``ttl`` seconds old, the estimate is enough (it only over-counts: jobs that left the queue
    meanwhile are not subtracted). Otherwise the count is read again, and the decision is exact as before. One per
    process (``functions.deps``), shared by its threads; it saves a round trip on most submits (the submit
    benchmark's ratio to raw I/O, bench/submit_overhead.py)."""

    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._value = 0
        self._since = 0  # jobs admitted on the estimate since the count was read
        self._read_at: float | None = None

    def backlog(self, jobs: JobStore, count: int, max_backlog: int) -> int:
        """The backlog to compare ``count`` new jobs with: the estimate when it is safely low (and those jobs are
        then counted in it), else a fresh count."""
        with self._lock:
            fresh = self._read_at is not None and self._clock() - self._read_at < self._ttl
            if fresh and 2 * (self._value + self._since + count) <= max_backlog:
                estimate = self._value + self._since
                self._since += count
                return estimate
        value = jobs.backlog()
        metrics.queued_seen(value)  # reported as crop_ai.jobs.queued (the workers-silent alert's backlog)
        with self._lock:  # the new jobs count as admitted: if they are refused, the estimate only over-counts
            self._value, self._since, self._read_at = value, count, self._clock()
        return value


@dataclass(frozen=True)
class Policy:
    """``max_backlog``: queued jobs at which new submits are refused (``None``: no bound); whether callbacks may
    target private addresses and plain http (local development only); ``gauge``: the process's
    :class:`BacklogGauge` (a fresh one counts on every submit); ``confirm``: how :func:`hand_over` records a send
    (the API's :class:`shared.confirmations.ConfirmBehind`; ``None``: inline)."""

    max_backlog: int | None = None
    allow_private_callbacks: bool = False
    gauge: BacklogGauge = field(default_factory=lambda: BacklogGauge(ttl=0.0))
    confirm: Confirm | None = None


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an Idempotency-Key replay of an existing job
    webhook_secret: str | None = None  # the job's signing secret, when it has a callback


@dataclass(frozen=True)
class Image:
    """An image that passed validation: its bytes, their SHA-256, and the job's parameters. An image by reference
    (``params["input"]``) has a ``sha256`` of its reference, ``data`` to store only for a URL (the reference
    document) and, for an upload or a blob, the blob that is its input (``blob``: nothing to store)."""

    data: bytes
    sha256: str
    params: dict[str, Any]
    blob: str | None = None

    def input_blob(self, job_id: UUID) -> str:
        if self.blob is not None:
            return self.blob
        return reference_blob_name(job_id) if "input" in self.params else input_blob_name(job_id)


class Accepted(BaseModel):
    """The body of ``POST /api/jobs``: 202 for a new job, 200 for an ``Idempotency-Key`` replay."""

    job_id: UUID
    status: JobStatus
    status_url: str = Field(description="GET it for the job's status (also the Location header)")
    priority: Priority
    webhook_secret: str | None = Field(
        None, description="signs the job's webhooks (Standard Webhooks); only with a callback_url, never in a GET"
    )


def input_blob_name(job_id: UUID) -> str:
    return f"{job_id}/input.tif"


def submit(
    upload: Upload | ByReference,
    *,
    limits: Limits,
    jobs: JobStore,
    store: InputStore,
    publisher: Publisher,
    policy: Policy | None = None,
    find: Callable[[ByReference], Found] | None = None,
) -> Submitted:
    """Submit ``upload`` (an image in the request, or by reference: then ``find`` locates it and checks its header,
    :func:`shared.by_reference.find`)."""
    policy = policy or Policy()
    key = idempotency_key(upload.idempotency_key)
    if isinstance(upload, ByReference):
        assert find is not None, "a submit by reference needs a way to find the image"
        image = referenced_image(find(upload), upload)
    else:
        fields = None if upload.geometry is None else parse_fields(upload.geometry, upload.max_fields)
        image = validate_image(upload.data, limits, upload.bands, upload.scale, upload.analysis, fields)
    chosen = priority(upload.priority)
    target = callback_target(upload.callback_url, upload.callback_events, policy.allow_private_callbacks)
    admit(jobs, 1, policy, lambda: key is not None and jobs.find_by_key(key) is not None)
    callback = new_callback(target)
    with tracer.start_as_current_span("crop-ai.submit") as span:
        job_id = uuid.uuid4()
        job, created = jobs.create(
            job_id=job_id,
            input_blob=image.input_blob(job_id),
            input_sha256=image.sha256,
            params=image.params,
            idempotency_key=key,
            priority=chosen,
            callback=callback,
        )
        span.set_attribute("crop_ai.job_id", str(job.job_id))
        span.set_attribute("crop_ai.idempotent_replay", not created)
        action = "submit" if created else "replay"
        owned = created  # this request created (or resubmitted) the job: a failed upload fails it
        if not created and job.status is JobStatus.FAILED and job.error_code == EnqueueFailed.code:
            resubmitted = jobs.resubmit(job.job_id)
            owned = resubmitted is not None
            job = resubmitted or jobs.get(job.job_id) or job  # lost the race: the job as the winner left it
            action = "resubmit" if owned else "replay"
        if owned or (job.status is JobStatus.QUEUED and job.sent_at is None):
            store_input(job, image.data, jobs, store, owned=owned)
            job = hand_over(job, jobs, publisher, policy.confirm)
        if owned:  # a new job (or one resubmitted after enqueue_failed) is on its way to a worker
            metrics.job_submitted(str(job.params.get("analysis", DEFAULT_ANALYSIS)), job.priority)
        extra = {"job_id": str(job.job_id), "action": action}
        log.info("job %s accepted (%s, %s)", job.job_id, job.status.value, action, extra=extra)
        secret = callback.secret if created and callback else stored_secret(jobs, job)
        return Submitted(job=job, created=created, webhook_secret=secret)


def validate_image(
    data: bytes,
    limits: Limits,
    bands: str | None,
    scale: str | None,
    analysis: str | None,
    fields: Fields | None = None,
) -> Image:
    """The image checked (header, bands, scale, analysis; ``fields`` against its footprint) with the job's
    parameters, or :class:`Rejected`."""
    header = inspect(data, limits, georeferencing=fields is not None)  # the CRS only places fields (shared.geotiff)
    params = job_params(header, bands, scale, analysis)
    if fields is not None:
        params.update(placed_fields(fields, header))
    return Image(data, hashlib.sha256(data).hexdigest(), params)


def referenced_image(found: Found, request: ByReference) -> Image:
    """The job's image for a submit by reference: nothing to store but a URL's reference document."""
    params = job_params(found.header, request.bands, request.scale, request.analysis)
    params["input"] = found.reference.params()
    if request.geometry is not None:
        params.update(fields_params(request.geometry, found.header, request.max_fields))
    reference = found.reference
    if reference.kind == "url":
        return Image(reference.document(), reference.digest, params)
    return Image(b"", reference.digest, params, blob=reference.location)


def fields_params(geometry: object, header: ImageHeader, max_fields: int) -> dict[str, Any]:
    """The job's ``fields`` (:mod:`shared.fields`): GeoJSON field boundaries parsed, checked against the image."""
    return placed_fields(parse_fields(geometry, max_fields), header)


def placed_fields(fields: Fields, header: ImageHeader) -> dict[str, Any]:
    """The job's ``fields`` once they are known to intersect the image (``geometry_outside_scene`` if not)."""
    check_intersects(fields, header)
    return {"fields": fields.to_params()}


def priority(text: str | None) -> Priority:
    value = "normal" if text is None else text.strip().lower()
    for known in PRIORITIES:
        if value == known:
            return known
    raise Rejected("invalid_priority", f"priority must be one of {', '.join(PRIORITIES)}, got {text!r}")


def callback_target(url: str | None, events: str | None, allow_private: bool) -> tuple[str, list[str] | None] | None:
    """The validated ``(callback_url, callback_events)``, or ``None`` without a callback."""
    if url is None:
        if events is not None:
            raise Rejected("invalid_callback_events", "callback_events needs a callback_url")
        return None
    return validate_callback(url, events, allow_private=allow_private)


def new_callback(target: tuple[str, list[str] | None] | None) -> Callback | None:
    """The callback to store, with a fresh signing secret."""
    return None if target is None else Callback(url=target[0], events=target[1], secret=new_secret())


def stored_secret(jobs: JobStore, job: Job) -> str | None:
    """A replay answers with the secret the job was created with."""
    return jobs.webhook_secret(job.job_id) if job.callback_url is not None else None


def admit(jobs: JobStore, count: int, policy: Policy, is_replay: Callable[[], bool]) -> None:
    """Admission control: refuse ``count`` new jobs (``backlog_full``) when they would take the queued jobs past
    ``policy.max_backlog``, unless the request replays an earlier one (``is_replay``, asked only then)."""
    max_backlog = policy.max_backlog
    if max_backlog is None:
        return
    backlog = policy.gauge.backlog(jobs, count, max_backlog)
    if backlog + count <= max_backlog or is_replay():
        return
    extra = {"action": "backlog_full", "backlog": backlog, "count": count}
    log.warning("submit of %d job(s) refused: %d jobs queued (max %d)", count, backlog, max_backlog, extra=extra)
    raise Rejected(
        "backlog_full", f"{backlog} jobs are queued and the limit is {max_backlog}; submit again after Retry-After"
    )


def job_params(header: ImageHeader, bands: str | None, scale: str | None, analysis: str | None) -> dict[str, Any]:
    """The job's parameters (what the message carries), from the query and the file's header."""
    return {
        "bands": _bands(header, bands),
        "scale": _scale(header, scale),
        "analysis": _analysis(analysis),
    }


def store_input(job: Job, data: bytes, jobs: JobStore, store: InputStore, *, owned: bool) -> None:
    """Upload the job's image. If that fails, an ``owned`` job (this request created or resubmitted it) is failed
    ``enqueue_failed``; :class:`EnqueueFailed` either way."""
    extra = {"job_id": str(job.job_id), "action": "enqueue"}
    by_reference = "input" in job.params
    if by_reference and not data:
        return  # an upload or a blob of the images container: the job's input_blob is the file itself
    try:
        if by_reference:  # a URL's reference document
            store.put_input(job.job_id, data, job.input_sha256, name=job.input_blob)
        else:
            store.put_input(job.job_id, data, job.input_sha256)
    except StorageUnavailable as e:
        log.error("job %s: could not store the image: %s", job.job_id, e.message, extra=extra)
        if owned:
            jobs.abort_submit(job.job_id, job.generation, EnqueueFailed.code, f"could not store the image: {e.message}")
        raise EnqueueFailed(job.job_id, "the image could not be stored; submit it again") from e


def hand_over(job: Job, jobs: JobStore, publisher: Publisher, confirm: Confirm | None = None) -> Job:
    """Send the message of the job's current generation, then confirm the send on its row (its image is stored):
    inline, or through ``confirm`` (the API's :class:`shared.confirmations.ConfirmBehind`, which answers before the
    row is written); return the job as it now is. A failed send is ambiguous: the job stays queued and unconfirmed,
    for a worker or the reconciler. A failed confirm leaves it to them too. Neither raises."""
    message = JobMessage.for_job(job)
    extra = {"job_id": str(job.job_id), "message_id": message.message_id, "action": "enqueue"}
    try:
        publisher.send(message)
    except BusUnavailable as e:  # ambiguous: it may have arrived. The job stays claimable; the reconciler heals it.
        log.warning("job %s: send not confirmed, left to the reconciler: %s", job.job_id, e.message, extra=extra)
        return job
    return confirm(job) if confirm is not None else confirm_now(job, jobs)


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.match(value):
        raise Rejected("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 visible ASCII characters")
    return value


def _bands(header: ImageHeader, text: str | None) -> list[str]:
    try:
        names = parse_names(text) if text is not None else _described(header)
        if len(names) != header.count:
            raise Rejected(
                "band_count_mismatch", f"{len(names)} band names given for an image with {header.count} bands"
            )
        band_set = resolve(names)
    except BandError as e:
        raise Rejected("invalid_bands", str(e)) from e
    if not band_set.has("red", "nir"):
        raise Rejected("missing_bands", f"a red and a NIR band are needed; the bands are {', '.join(names)}")
    return names


def _described(header: ImageHeader) -> list[str]:
    if any(not d for d in header.descriptions):
        raise Rejected(
            "bands_required",
            "the image's bands have no descriptions: name them in file order with ?bands=, e.g. B02,B03,B04,B08",
        )
    return [d for d in header.descriptions if d]


def _scale(header: ImageHeader, text: str | None) -> float:
    if text is None:
        return 10000.0 if header.integer else 1.0
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise Rejected("invalid_scale", f"scale must be a positive number (reflectance = DN / scale), got {text!r}")
    return scale


def _analysis(text: str | None) -> str:
    value = DEFAULT_ANALYSIS if text is None else text.strip()
    if not _ANALYSIS.match(value):
        raise Rejected("invalid_analysis", f"analysis must be 'crop-health' or 'model:<name>', got {text!r}")
    return value
