"""``DELETE /api/jobs/{job_id}`` (cancel) and ``POST /api/jobs/{job_id}/retry``: :mod:`shared.control` does the work.

Both answer with the job's view (:class:`shared.status.JobView`). Cancel: 200 when the job is cancelled, 202 (and
``Location``) when a running job's cancellation is requested (it stops at its next checkpoint); 409 ``job_finished``
for a succeeded or failed job. Retry: 202 with ``Location`` and ``Retry-After``; 409 ``not_retryable`` (queued,
running, succeeded) or ``resubmit_required`` (failed ``enqueue_failed``: submit the image again). Once the change is
committed the answer is given: what is read after it (the webhook summary) is left out if it cannot be read.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import azure.functions as func

from functions import deps
from functions.http import resource_url
from functions.problems import guarded
from shared.control import cancel, retry
from shared.errors import TransientError
from shared.jobs import Job
from shared.status import job_view, parse_job_id

log = logging.getLogger(__name__)

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("cancel_job")
@bp.route(route="jobs/{job_id}", methods=[func.HttpMethod.DELETE])
@guarded(deps.retry_after)
def cancel_job(req: func.HttpRequest) -> func.HttpResponse:
    job_id = parse_job_id(req.route_params.get("job_id", ""))
    d = deps.get()
    outcome = cancel(job_id, jobs=d.jobs, notifier=d.notifier)
    headers = {"Location": resource_url(req, f"jobs/{job_id}", depth=2)[0]} if outcome.pending else {}
    return _view(outcome.job, 202 if outcome.pending else 200, headers)


@bp.function_name("retry_job")
@bp.route(route="jobs/{job_id}/retry", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def retry_job(req: func.HttpRequest) -> func.HttpResponse:
    job_id = parse_job_id(req.route_params.get("job_id", ""))
    d = deps.get()
    job = retry(job_id, jobs=d.jobs, publisher=d.publisher)
    location, _ = resource_url(req, f"jobs/{job_id}", depth=3)
    return _view(job, 202, {"Location": location, "Retry-After": str(d.settings.retry_after_seconds)})


def _view(job: Job, status: int, headers: dict[str, str]) -> func.HttpResponse:
    d = deps.get()
    body = job_view(job, d.blobs, d.settings.result_sas_ttl, _webhook(d, job))
    return func.HttpResponse(json.dumps(body), status_code=status, headers=headers, mimetype="application/json")


def _webhook(d: deps.Deps, job: Job) -> dict[str, Any] | None:
    """The job's webhook summary, best-effort: the change is committed, so a failed read leaves ``webhook`` out of
    the answer rather than answering 503 (whose repeat would find the job already moved: 409 for a retry)."""
    if not job.callback_url:
        return None
    try:
        return d.webhook_summary(job.job_id)
    except TransientError as e:
        extra = {"job_id": str(job.job_id), "action": "webhook_summary_skipped"}
        log.warning("job %s: answered without its webhook summary: %s", job.job_id, e.code, extra=extra)
        return None
