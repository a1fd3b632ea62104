"""``GET /api/jobs``: jobs newest first, filtered, one keyset page at a time (:mod:`shared.listing` does the work).

Query: ``status``, ``analysis``, ``created_after``, ``created_before`` (ISO 8601 with an offset), ``batch_id``,
``limit`` (1..1000, default 100) and ``next`` (the cursor of the previous page). The route is the submit's
(``jobs``) with another method: two functions, one per method, as the Functions host allows.
"""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared import listing

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("list_jobs")
@bp.route(route="jobs", methods=[func.HttpMethod.GET])
@guarded(deps.retry_after)
def list_jobs(req: func.HttpRequest) -> func.HttpResponse:
    query = listing.parse_query(req.params)
    page = listing.list_jobs(deps.get().jobs, query)
    return func.HttpResponse(
        json.dumps(page.model_dump(mode="json")),
        status_code=200,
        headers={"Cache-Control": "no-store"},
        mimetype="application/json",
    )
