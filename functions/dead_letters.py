"""``GET /api/dead-letters`` and ``POST /api/dead-letters/replay``: :mod:`shared.dead_letters` does the work.

``GET``: ``?limit=`` (1 to 1000, default 100), ``reason=``, ``action=`` (redrive | failed | none); newest first.
``POST .../replay``: a JSON body ``{"reason"?: str, "limit"?: int}`` (or the same in the query) → 200
``{"replayed": [job ids], "skipped": n}``. A bad parameter is 400 ``invalid_filter`` naming it; so is a body that is
not a JSON object, nests too deep, or is over 4 KiB.
"""

from __future__ import annotations

import json

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.dead_letters import dead_letters as read_dead_letters
from shared.dead_letters import query, replay, replay_request

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("dead_letters")
@bp.route(route="dead-letters", methods=[func.HttpMethod.GET])
@guarded(deps.retry_after)
def dead_letters(req: func.HttpRequest) -> func.HttpResponse:
    where = query(req.params)
    page = read_dead_letters(deps.get().jobs, where)
    return _json(page.model_dump(mode="json"), {"Cache-Control": "no-store"})


@bp.function_name("replay_dead_letters")
@bp.route(route="dead-letters/replay", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def replay_dead_letters(req: func.HttpRequest) -> func.HttpResponse:
    request = replay_request(req.params, req.get_body())
    d = deps.get()
    result = replay(request, jobs=d.jobs, publisher=d.publisher)
    return _json(result.model_dump(mode="json"), {})


def _json(body: object, headers: dict[str, str]) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=200, headers=headers, mimetype="application/json")
