"""``GET /api/jobs/{job_id}``: the job's status, its result when succeeded, its error when failed."""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.problems import guarded, problem
from shared.status import job_view, parse_job_id

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("job_status")
@bp.route(route="jobs/{job_id}", methods=[func.HttpMethod.GET])
@guarded(deps.retry_after)
def job_status(req: func.HttpRequest) -> func.HttpResponse:
    job_id = parse_job_id(req.route_params.get("job_id", ""))
    d = deps.get()
    job = d.jobs.get(job_id)
    if job is None:
        return problem("job_not_found", f"there is no job {job_id}")
    headers = {"Cache-Control": "no-store"}
    if not job.status.terminal:
        headers["Retry-After"] = str(d.settings.retry_after_seconds)
    webhook = d.webhook_summary(job_id) if job.callback_url else None
    view = job_view(job, d.blobs, d.settings.result_sas_ttl, webhook)
    return func.HttpResponse(json.dumps(view), status_code=200, headers=headers, mimetype="application/json")
