"""``POST /api/uploads``: an upload id and a write-only SAS URL to put a large GeoTIFF in (:mod:`shared.uploads`)."""

from __future__ import annotations

import azure.functions as func

from functions import deps
from functions.problems import guarded
from shared.uploads import new_upload

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("create_upload")
@bp.route(route="uploads", methods=[func.HttpMethod.POST])
@guarded(deps.retry_after)
def create_upload(req: func.HttpRequest) -> func.HttpResponse:
    d = deps.get()
    ticket = new_upload(d.blobs, d.settings.upload_sas_ttl, d.settings.max_input_bytes)
    return func.HttpResponse(
        ticket.model_dump_json(), status_code=201, mimetype="application/json", headers={"Cache-Control": "no-store"}
    )
