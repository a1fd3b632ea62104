"""Cancel and retry: the API's control of a job that exists (``DELETE /api/jobs/{id}``, ``POST .../retry``).

Both read the job, pick the event its state allows, and run it; the event is conditional (:mod:`shared.lifecycle`),
so if the job moved in between (a worker claimed it, finished it, another request got there first) the event moves
nothing, and the use case reads the job again and answers from its new state. The job keeps moving forward, so a
few rounds settle it; past :data:`ROUNDS` the request is answered 503 (:class:`Contended`) and may be repeated.

Cancel: ``queued`` → ``cancel`` (done: ``cancelled``); ``running`` → ``request_cancel`` (under way: the attempt stops
at its next checkpoint); already ``cancelled``, or running with the cancellation requested → the same answer again;
``succeeded`` / ``failed`` → ``job_finished``. A job this request cancelled has its webhook flushed (:class:`Notifier`).

Retry: ``failed`` (any code but ``enqueue_failed``) or ``cancelled`` → ``retry`` (a new generation, past attempts
forgiven), then the new generation's message is handed over as a submit does (:func:`shared.submission.hand_over`:
an ambiguous send still answers, the reconciler heals it). ``enqueue_failed`` → ``resubmit_required``: its image was
never stored, so the client submits it again (the same ``Idempotency-Key`` resubmits the same job). Any other state
→ ``not_retryable``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

from shared.errors import TransientError
from shared.events import Notifier
from shared.jobs import Job, JobStatus, JobStore
from shared.rejection import Rejected
from shared.submission import EnqueueFailed, Publisher, hand_over

log = logging.getLogger(__name__)

ROUNDS = 5  # reads of a job that keeps moving under the request before it gives up


class Contended(TransientError):
    """The job kept changing under the request; repeat it."""

    code = "job_contended"


@dataclass(frozen=True)
class Controlled:
    """The job as the request left it; ``pending``: the change is under way, not done (answered 202, not 200)."""

    job: Job
    pending: bool


def cancel(job_id: UUID, *, jobs: JobStore, notifier: Notifier) -> Controlled:
    for _ in range(ROUNDS):
        job = _get(jobs, job_id)
        if job.status is JobStatus.CANCELLED:
            return Controlled(job, pending=False)
        if job.status is JobStatus.RUNNING and job.cancel_requested_at is not None:
            return Controlled(job, pending=True)
        if job.status.terminal:
            raise Rejected("job_finished", f"the job already {job.status.value}; there is nothing to cancel")
        if job.status is JobStatus.QUEUED:
            moved = jobs.cancel(job_id)
            if moved is not None:
                _log(moved, "cancel")
                notifier.flush(moved)
                return Controlled(moved, pending=False)
        else:
            moved = jobs.request_cancel(job_id)
            if moved is not None:
                _log(moved, "request_cancel")
                return Controlled(moved, pending=True)
    raise Contended(f"job {job_id} kept changing during the cancel")


def retry(job_id: UUID, *, jobs: JobStore, publisher: Publisher) -> Job:
    """Queue a failed or cancelled job again and hand over its new generation; the job as it now is."""
    for _ in range(ROUNDS):
        job = _get(jobs, job_id)
        check_retryable(job)
        moved = jobs.retry(job_id)
        if moved is not None:
            _log(moved, "retry")
            return hand_over(moved, jobs, publisher)
    raise Contended(f"job {job_id} kept changing during the retry")


def check_retryable(job: Job) -> None:
    """:class:`Rejected` unless ``retry`` allows the job's state."""
    if job.status is JobStatus.FAILED and job.error_code == EnqueueFailed.code:
        raise Rejected(
            "resubmit_required",
            "the job's image was never stored: submit it again (the same Idempotency-Key resubmits this job)",
        )
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise Rejected("not_retryable", f"the job is {job.status.value}: only a failed or cancelled job is retried")


def _get(jobs: JobStore, job_id: UUID) -> Job:
    job = jobs.get(job_id)
    if job is None:
        raise Rejected("job_not_found", f"there is no job {job_id}")
    return job


def _log(job: Job, action: str) -> None:
    extra = {"job_id": str(job.job_id), "action": action, "generation": job.generation}
    log.info("job %s: %s (%s)", job.job_id, action, job.status.value, extra=extra)
