"""The submit use case: validate an upload cheaply, record the job, store the image, queue the message.

Order and failure semantics (at-least-once, nothing orphaned):

1. Everything about the request is validated first (:func:`shared.geotiff.inspect`, bands, scale, analysis);
   a refusal raises :class:`~shared.rejection.Rejected` and nothing is stored.
2. The job row is inserted (``queued``, ``enqueued_at`` unset) *before* the image is uploaded: an
   ``Idempotency-Key`` replay or conflict is known at this point, so a replay never uploads a stray blob.
3. The image goes to ``images/{job_id}/input.tif``, then the message (``message_id = job_id``) is sent, then the job
   is marked sent (``enqueued_at``).
4. If 3 fails for a new job, the job is marked ``failed`` with code ``enqueue_failed`` (terminal and visible through
   the status endpoint, so it cannot stay ``queued`` for ever) and :class:`EnqueueFailed` (transient) is raised:
   the API answers 503 with ``Retry-After``. The client retries, with the same ``Idempotency-Key`` if it used one
   (see below). Should the send have reached the broker after all, the worker runs the job anyway
   (:meth:`~shared.jobs.JobRepository.start_attempt` starts a job failed with ``enqueue_failed``: its message was
   delivered), and a retry with the same key finds it ``processing`` or ``succeeded``.
5. A process that dies between 2 and the end of 3 leaves a ``queued`` job with ``enqueued_at`` unset. The worker's
   sweeper finds those (:meth:`~shared.jobs.JobRepository.stale_unsent`) and calls :func:`resend`: the message is
   sent again if the image is there, else the job fails with ``enqueue_failed``.

``Idempotency-Key``: same key + same bytes returns the existing job (``created=False``, the API answers 200):

* still ``queued``: its image and message are sent again (the upload overwrites identical bytes, Service Bus
  duplicate detection drops the second message), so a replay also heals a submit that crashed between insert and
  send. A failed re-send of such a replay leaves the job as it was (the first send may well have worked);
* ``failed`` with ``enqueue_failed`` (the retry after a 503): the job is atomically set back to ``queued``
  (:meth:`~shared.jobs.JobRepository.requeue_enqueue_failed`, a conditional update: of two concurrent retries one
  wins, the other sees a ``queued`` job) and handed over again, exactly like a new job: on failure it is
  ``failed``/``enqueue_failed`` again and the answer is 503 once more. (Had the first send reached the broker, the
  worker runs the job from that message, so a re-send dropped by duplicate detection loses nothing);
* any other state: the job as it is, nothing is sent.

Same key + other bytes raises :class:`~shared.jobs.IdempotencyConflict`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from opentelemetry import trace

from shared.bands import BandError, parse_names, resolve
from shared.errors import BusUnavailable, DatabaseUnavailable, InputMissing, StorageUnavailable, TransientError
from shared.geotiff import ImageHeader, Limits, inspect
from shared.jobs import Job, JobRepository, JobStatus
from shared.messages import JobMessage
from shared.rejection import Rejected

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_ANALYSIS = "crop-health"
_ANALYSIS = re.compile(r"^(crop-health|model:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as an HTTP header value can carry


class InputStore(Protocol):
    def put_input(self, job_id: UUID, data: bytes, sha256: str) -> str: ...


class InputChecker(Protocol):
    def input_sha256(self, blob_name: str) -> str | None:
        """The stored input's SHA-256 metadata; raises InputMissing when the blob is not there."""
        ...


class Publisher(Protocol):
    def send(self, message: JobMessage) -> None: ...


class EnqueueFailed(TransientError):
    """The image or the message could not be handed to the pipeline; the new job was marked failed."""

    code = "enqueue_failed"

    def __init__(self, job_id: UUID, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


@dataclass(frozen=True)
class Upload:
    data: bytes
    bands: str | None = None  # query values as received
    scale: str | None = None
    analysis: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an Idempotency-Key replay of an existing job


def input_blob_name(job_id: UUID) -> str:
    return f"{job_id}/input.tif"


def submit(
    upload: Upload, *, limits: Limits, repo: JobRepository, store: InputStore, publisher: Publisher
) -> Submitted:
    key = _idempotency_key(upload.idempotency_key)
    header = inspect(upload.data, limits)
    params = job_params(header, upload.bands, upload.scale, upload.analysis)
    sha256 = hashlib.sha256(upload.data).hexdigest()
    with tracer.start_as_current_span("crop-ai.submit") as span:
        job_id = uuid.uuid4()
        job, created = repo.create(
            job_id=job_id, input_blob=input_blob_name(job_id), input_sha256=sha256, params=params, idempotency_key=key
        )
        span.set_attribute("crop_ai.job_id", str(job.job_id))
        span.set_attribute("crop_ai.idempotent_replay", not created)
        extra = {"job_id": str(job.job_id), "action": "submit" if created else "replay"}
        owned = created
        if not created and job.status is JobStatus.FAILED and job.error_code == EnqueueFailed.code:
            requeued = repo.requeue_enqueue_failed(job.job_id)
            owned = requeued is not None
            job = requeued or repo.get(job.job_id) or job  # lost the race: the job as the winner left it
            extra["action"] = "retry" if owned else "replay"
        if owned or job.status is JobStatus.QUEUED:
            _hand_over(job, upload.data, store, publisher, repo, owned=owned)
        log.info("job %s accepted (%s, %s)", job.job_id, job.status.value, extra["action"], extra=extra)
        return Submitted(job=job, created=created)


def job_params(header: ImageHeader, bands: str | None, scale: str | None, analysis: str | None) -> dict[str, Any]:
    """The job's parameters (what the message carries), from the query and the file's header."""
    return {
        "bands": _bands(header, bands),
        "scale": _scale(header, scale),
        "analysis": _analysis(analysis),
    }


def message_for(job: Job) -> JobMessage:
    return JobMessage(
        job_id=job.job_id,
        input_blob=job.input_blob,
        input_sha256=job.input_sha256,
        bands=job.params["bands"],
        scale=job.params["scale"],
        analysis=job.params["analysis"],
        submitted_at=job.created_at,
    )


def _hand_over(
    job: Job, data: bytes, store: InputStore, publisher: Publisher, repo: JobRepository, *, owned: bool
) -> None:
    """Upload and send; ``owned``: this request created (or re-queued) the job, so a failure fails it."""
    extra = {"job_id": str(job.job_id), "action": "enqueue"}
    try:
        store.put_input(job.job_id, data, job.input_sha256)
        publisher.send(message_for(job))
    except (StorageUnavailable, BusUnavailable) as e:
        step = "store the image" if isinstance(e, StorageUnavailable) else "queue the job"
        log.error("job %s: could not %s: %s", job.job_id, step, e.message, extra=extra)
        if owned:
            repo.fail(job.job_id, EnqueueFailed.code, f"could not {step}: {e.message}"[:1000])
        raise EnqueueFailed(job.job_id, f"could not {step}; submit the image again") from e
    try:
        repo.mark_enqueued(job.job_id)
    except DatabaseUnavailable as e:  # the job is on its way; at worst the sweeper sends it once more
        log.warning("job %s: sent, but not recorded as sent: %s", job.job_id, e.message, extra=extra)


def resend(job: Job, store: InputChecker, publisher: Publisher, repo: JobRepository) -> bool:
    """Hand a ``queued`` job that was never recorded as sent (:meth:`JobRepository.stale_unsent`) to the bus again.

    The message is rebuilt from the job's row (:func:`message_for`). If the input blob is there it is sent and the
    job marked sent: ``True``. If the blob is missing (the submit died before the upload) the job is failed with
    ``enqueue_failed`` (nobody else can supply the image): ``False``. Storage, bus and database errors propagate
    (transient: the next sweep tries again). A job that is no longer ``queued`` is left alone: ``False``.
    """
    extra = {"job_id": str(job.job_id), "message_id": str(job.job_id), "action": "resend"}
    if job.status is not JobStatus.QUEUED:
        return False
    try:
        store.input_sha256(job.input_blob)
    except InputMissing:
        log.warning("job %s: never sent and its image is missing; failing it", job.job_id, extra=extra)
        repo.fail(job.job_id, EnqueueFailed.code, "the image was never stored; submit it again")
        return False
    publisher.send(message_for(job))
    repo.mark_enqueued(job.job_id)
    log.info("job %s: sent again (its submit never recorded the send)", job.job_id, extra=extra)
    return True


def _idempotency_key(value: str | None) -> str | None:
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
