"""``GET /api/health`` (anonymous): 200 when the database, Blob Storage and Service Bus all answer within about 2 s,
503 with ``Retry-After`` otherwise (:mod:`shared.health` does the work). The body names no host, driver or error.

One :class:`~shared.health.HealthMonitor` per set of dependencies (the process's, or a test's after
:func:`functions.deps.use`): however many requests come, the backends are probed at most once per
:data:`~shared.health.DEFAULT_TTL`, and concurrent requests share a round."""

from __future__ import annotations

import json
import threading

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.health import HealthMonitor

bp = func.Blueprint()  # type: ignore[no-untyped-call]

_lock = threading.Lock()
_current: tuple[deps.Deps, HealthMonitor] | None = None


@bp.function_name("health")
@bp.route(route="health", methods=[func.HttpMethod.GET], auth_level=func.AuthLevel.ANONYMOUS)
@guarded(deps.retry_after)
def health(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    report = _monitor(d).check()
    headers = {"Cache-Control": "no-store"}
    if not report.ok:
        headers["Retry-After"] = str(d.settings.retry_after_seconds)
    return func.HttpResponse(
        json.dumps(report.model_dump(mode="json")),
        status_code=200 if report.ok else 503,
        headers=headers,
        mimetype="application/json",
    )


def _monitor(d: deps.Deps) -> HealthMonitor:
    """The monitor of ``d``'s backends, built on first use."""
    global _current
    with _lock:
        if _current is None or _current[0] is not d:
            jobs_queue = [d.settings.jobs_queue]
            _current = (d, HealthMonitor(d.jobs.ping, d.blobs.ping, lambda: d.queue_stats.counts(jobs_queue)))
        return _current[1]
