"""Jobs for tests: a bare :class:`~shared.jobs.Job` record, or a job created (and moved) in a job store."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.jobs import Job, JobStatus, JobStore
from shared.submission import InputStore, input_blob_name

PARAMS: dict[str, Any] = {"bands": ["B02", "B03", "B04", "B08"], "scale": 10000.0, "analysis": "crop-health"}
LEASE = timedelta(minutes=5)
GONE = timedelta(seconds=-1)  # a lease that has already run out; an age every job has reached


def job_record(status: JobStatus, **fields: Any) -> Job:
    now = datetime.now(UTC)
    defaults: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "created_at": now,
        "updated_at": now,
        "attempts": 1,
        "input_blob": "x/input.tif",
        "input_sha256": "0" * 64,
        "params": {},
    }
    return Job(status=status, **{**defaults, **fields})


def new_job(
    jobs: JobStore,
    data: bytes = b"image bytes",
    *,
    store: InputStore | None = None,
    key: str | None = None,
    params: dict[str, Any] | None = None,
) -> Job:
    """A queued job (generation 1, send unconfirmed), as a submit leaves it right after the insert; with ``store``,
    its image is stored too."""
    job_id = uuid.uuid4()
    sha256 = hashlib.sha256(data).hexdigest()
    job, created = jobs.create(
        job_id=job_id,
        input_blob=input_blob_name(job_id),
        input_sha256=sha256,
        params=PARAMS if params is None else params,
        idempotency_key=key,
    )
    assert created
    if store is not None:
        store.put_input(job_id, data, sha256)
    return job


def claimed(jobs: JobStore, job: Job, *, lease: timedelta = LEASE, worker: str = "w1", max_attempts: int = 5) -> Job:
    """``job`` claimed by ``worker`` (``lease=GONE``: a claim whose lease has already run out)."""
    moved = jobs.claim(job.job_id, worker_id=worker, lease=lease, max_attempts=max_attempts)
    assert moved is not None, f"job {job.job_id} could not be claimed"
    return moved
