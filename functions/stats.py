"""``GET /api/stats``: job counts, recent throughput, run and queue-wait percentiles, workers and queue depths
(:mod:`shared.stats` does the work). The database down is a 503; Service Bus down only empties ``queues``."""

from __future__ import annotations

import json
from datetime import timedelta

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.stats import read_stats

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("stats")
@bp.route(route="stats", methods=[func.HttpMethod.GET])
@guarded(deps.retry_after)
def stats(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    settings = d.settings
    queues = (settings.jobs_high_queue, settings.jobs_queue, settings.job_events_queue)
    alive_within = timedelta(seconds=3 * settings.worker_registry_interval)
    body = read_stats(d.stats, d.queue_stats, queues, alive_within=alive_within)
    return func.HttpResponse(
        json.dumps(body.model_dump(mode="json")),
        status_code=200,
        headers={"Cache-Control": "no-store"},
        mimetype="application/json",
    )
