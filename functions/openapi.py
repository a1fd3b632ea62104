"""``GET /api/openapi.json`` (anonymous): the OpenAPI 3.1 document of the API (:mod:`shared.openapi` builds it)."""

from __future__ import annotations

import functools
import json

import azure.functions as func

from functions import deps
from functions.problems import PROBLEMS, UNAVAILABLE_DETAILS, guarded
from shared.openapi import document

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@functools.cache
def document_json() -> str:
    """Built once per process: the document depends on the code only."""
    return json.dumps(document(PROBLEMS, UNAVAILABLE_DETAILS), separators=(",", ":"))


@bp.function_name("openapi")
@bp.route(route="openapi.json", methods=[func.HttpMethod.GET], auth_level=func.AuthLevel.ANONYMOUS)
@guarded(deps.retry_after)
def openapi(req: func.HttpRequest) -> func.HttpResponse:
    headers = {"Cache-Control": "public, max-age=300"}
    return func.HttpResponse(document_json(), status_code=200, headers=headers, mimetype="application/json")
