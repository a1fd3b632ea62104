"""``GET /api/health`` (anonymous): 200 when the database, Blob Storage and Service Bus all answer within about 2 s,
503 with ``Retry-After`` otherwise (:mod:`shared.health` does the work). The body names no host, driver or error."""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.health import check_health

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("health")
@bp.route(route="health", methods=[func.HttpMethod.GET], auth_level=func.AuthLevel.ANONYMOUS)
@guarded(deps.retry_after)
def health(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    jobs_queue = [d.settings.jobs_queue]
    report = check_health(d.jobs.ping, d.blobs.ping, lambda: d.queue_stats.counts(jobs_queue))
    headers = {"Cache-Control": "no-store"}
    if not report.ok:
        headers["Retry-After"] = str(d.settings.retry_after_seconds)
    return func.HttpResponse(
        json.dumps(report.model_dump(mode="json")),
        status_code=200 if report.ok else 503,
        headers=headers,
        mimetype="application/json",
    )
