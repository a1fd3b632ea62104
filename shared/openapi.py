"""The OpenAPI 3.1 document of the HTTP API (``GET /api/openapi.json``), built from the pydantic models the
handlers answer with, so that it cannot drift from what they serialise.

:data:`OPERATIONS` says, for each route and method, its parameters, its request body, its success answers (a model
each) and the problem codes it can answer; :func:`document` turns that into the document: the models' schemas
under ``components.schemas`` (``models_json_schema``, shared definitions once), one problem+json response per
status with the route's codes as an enum, and the function key (``x-functions-key`` header or ``code`` query) on
every route but the anonymous ones. The problem statuses come from ``functions/problems.py``'s table, passed in.

``tests/unit/test_openapi.py`` checks the table against the routes ``function_app`` registers (and the reverse)
and validates the document as OpenAPI 3.1; ``tests/acceptance/test_schemathesis.py`` checks the running API
against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from shared.batches import BatchAccepted, BatchView
from shared.by_reference import SubmitByReference
from shared.dead_letters import DeadLetterPage, ReplayRequest, ReplayResult
from shared.health import Health
from shared.jobs import PRIORITIES, JobStatus
from shared.stats import Stats
from shared.status import JobPage, JobView
from shared.submission import Accepted
from shared.uploads import UploadTicket

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
SERVER_URL = "/api"  # host.json's routePrefix
REF = "#/components/schemas/{model}"
PROBLEM_TYPE = "application/problem+json"
_RST = re.compile(r"(?::\w+:)?``?([^`]+)``?")
SECURITY: list[dict[str, list[str]]] = [{"functionKey": []}, {"functionKeyQuery": []}]


class Problem(BaseModel):
    """RFC 9457 problem details with a stable ``code``; some codes add members (``job_id``, ``index``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


class OpenApiDocument(BaseModel):
    """What ``GET /api/openapi.json`` answers (the schema of the document itself is OpenAPI's)."""

    model_config = ConfigDict(extra="allow")

    openapi: str


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["query", "path", "header"]
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Answer:
    """A success response: its status, its body's model, the headers it carries (names in :data:`HEADERS`)."""

    status: int
    model: type[BaseModel]
    description: str
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    method: Literal["get", "post", "delete"]
    path: str  # below SERVER_URL, as the route template (without constraints) with a leading slash
    operation_id: str  # the Function's name
    summary: str
    answers: tuple[Answer, ...]
    problems: tuple[str, ...]  # codes; internal_error (and 401 for keyed routes) are added to every operation
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None  # an OpenAPI requestBody
    anonymous: bool = False
    tags: tuple[str, ...] = field(default=("jobs",))


HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "The resource's path", "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds to wait before asking again", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "An Idempotency-Key replay: the existing resource",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Cache-Control": {"description": "no-store: the answer changes", "schema": {"type": "string"}},
}

_UUID = {"type": "string", "format": "uuid"}
_BINARY = {"type": "string", "format": "binary"}
JOB_ID = Param("job_id", "path", _UUID, "The job's id (as in the submit answer's job_id)", required=True)
BATCH_ID = Param("batch_id", "path", _UUID, "The batch's id", required=True)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
    "The same key with the same content answers the existing job (200); with other content 409",
)
SUBMIT_PARAMS = (
    Param("bands", "query", {"type": "string"}, "Band names in file order, comma-separated (B02,B03,B04,B08...)"),
    Param("scale", "query", {"type": "number", "exclusiveMinimum": 0}, "reflectance = DN / scale"),
    Param(
        "analysis",
        "query",
        {
            "type": "string",
            "pattern": "^(crop-health|model:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$",
            "default": "crop-health",
        },
        "crop-health, or model:<name> for a model in MODELS_DIR",
    ),
    Param("priority", "query", {"type": "string", "enum": list(PRIORITIES), "default": "normal"}, "Which queue"),
    Param("callback_url", "query", {"type": "string", "format": "uri", "maxLength": 2048}, "Webhook target (https)"),
    Param(
        "callback_events",
        "query",
        {"type": "string", "pattern": "^(started|progress|completed)(,(started|progress|completed))*$"},
        "Webhook event groups, comma-separated (default: completed)",
    ),
    IDEMPOTENCY_KEY,
)
LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size")
LIST_PARAMS = (
    Param("status", "query", {"type": "string", "enum": [s.value for s in JobStatus]}, "Only jobs in this status"),
    Param("analysis", "query", {"type": "string"}, "Only jobs of this analysis"),
    Param("created_after", "query", {"type": "string", "format": "date-time"}, "ISO 8601 with an offset"),
    Param("created_before", "query", {"type": "string", "format": "date-time"}, "ISO 8601 with an offset"),
    Param("batch_id", "query", _UUID, "Only the jobs of this batch"),
    LIMIT,
    Param("next", "query", {"type": "string"}, "The previous page's next cursor"),
)
DEAD_LETTER_PARAMS = (
    LIMIT,
    Param("reason", "query", {"type": "string"}, "Only dead letters with this reason"),
    Param("action", "query", {"type": "string", "enum": ["redrive", "failed", "none"]}, "What the reconciler did"),
)
GEOMETRY = {
    "type": "string",
    "description": "Field boundaries: GeoJSON text (a Polygon, MultiPolygon, Feature or FeatureCollection of at most "
    "MAX_FIELDS features), as the JSON body's `geometry`; a plain form field or a file part",
}
GEOMETRY_PART = {"contentType": "application/geo+json, application/json, text/plain"}
IMAGE_BODY = {
    "required": True,
    "description": "A GeoTIFF: the raw bytes, or multipart/form-data with the file in field `image` (and, optionally, "
    "field boundaries as GeoJSON text in field `geometry`); or, as application/json, the image by reference (an "
    "upload of POST /api/uploads, or an image_url)",
    "content": {
        "application/json": {"schema": {"$ref": REF.format(model="SubmitByReference")}},
        "image/tiff": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"image": _BINARY, "geometry": GEOMETRY}, "required": ["image"]},
            "encoding": {"image": {"contentType": "image/tiff, application/octet-stream"}, "geometry": GEOMETRY_PART},
        },
    },
}
BATCH_BODY = {
    "required": True,
    "description": "multipart/form-data with one GeoTIFF per `image` field (1 to MAX_BATCH_SIZE) and, optionally, "
    "one `geometry` field: GeoJSON field boundaries for every image",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "array", "items": _BINARY, "minItems": 1}, "geometry": GEOMETRY},
                "required": ["image"],
            },
            "encoding": {"image": {"contentType": "image/tiff, application/octet-stream"}, "geometry": GEOMETRY_PART},
        }
    },
}

SUBMIT_PROBLEMS = (
    *("empty_body", "not_a_tiff", "invalid_multipart", "missing_image_field", "invalid_scale", "invalid_analysis"),
    *("invalid_idempotency_key", "invalid_priority", "invalid_callback_url", "invalid_callback_events"),
    *("idempotency_conflict", "payload_too_large", "unsupported_media_type", "unreadable_image", "truncated_image"),
    *("image_too_large", "too_many_bands", "bands_required", "band_count_mismatch", "invalid_bands", "missing_bands"),
    "no_valid_pixels",
    *("invalid_request_body", "invalid_upload_id", "invalid_image_url", "image_url_not_allowed", "upload_not_found"),
    "upload_expired",
    *("image_unreachable", "invalid_geometry", "too_many_fields", "geometry_outside_scene"),
    *("backlog_full", "enqueue_failed", "database_unavailable", "storage_unavailable", "bus_unavailable"),
)
JOB_PROBLEMS = ("invalid_job_id", "job_not_found", "database_unavailable")
CONTROL_PROBLEMS = (*JOB_PROBLEMS, "job_contended")  # cancel and retry: the job moved under the request

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/jobs",
        "submit_job",
        "Submit a GeoTIFF for analysis",
        (
            Answer(202, Accepted, "Accepted: the job is queued", ("Location", "Retry-After")),
            Answer(200, Accepted, "An Idempotency-Key replay", ("Location", "Retry-After", "Idempotent-Replayed")),
        ),
        SUBMIT_PROBLEMS,
        SUBMIT_PARAMS,
        IMAGE_BODY,
    ),
    Operation(
        "post",
        "/uploads",
        "create_upload",
        "Get a write-only URL to upload a large GeoTIFF to (then submit its upload_id)",
        (Answer(201, UploadTicket, "The upload's id and its SAS URL", ("Cache-Control",)),),
        ("storage_unavailable",),
    ),
    Operation(
        "get",
        "/jobs",
        "list_jobs",
        "List jobs, newest first",
        (Answer(200, JobPage, "A page of jobs"),),
        ("invalid_filter", "invalid_cursor", "database_unavailable"),
        LIST_PARAMS,
    ),
    Operation(
        "get",
        "/jobs/{job_id}",
        "job_status",
        "A job's status, result and error",
        (Answer(200, JobView, "The job", ("Retry-After", "Cache-Control")),),
        JOB_PROBLEMS,
        (JOB_ID,),
    ),
    Operation(
        "delete",
        "/jobs/{job_id}",
        "cancel_job",
        "Cancel a job (a running one: cancellation requested)",
        (Answer(200, JobView, "Cancelled"), Answer(202, JobView, "Cancellation requested", ("Location",))),
        (*CONTROL_PROBLEMS, "job_finished"),
        (JOB_ID,),
    ),
    Operation(
        "post",
        "/jobs/{job_id}/retry",
        "retry_job",
        "Run a failed or cancelled job again",
        (Answer(202, JobView, "Queued again", ("Location", "Retry-After")),),
        (*CONTROL_PROBLEMS, "not_retryable", "resubmit_required"),
        (JOB_ID,),
    ),
    Operation(
        "post",
        "/batches",
        "submit_batch",
        "Submit several GeoTIFFs as one batch",
        (
            Answer(202, BatchAccepted, "Accepted: every job is queued", ("Location", "Retry-After")),
            Answer(200, BatchAccepted, "An Idempotency-Key replay", ("Location", "Idempotent-Replayed")),
        ),
        (*SUBMIT_PROBLEMS, "empty_batch", "batch_too_large"),
        SUBMIT_PARAMS,
        BATCH_BODY,
        tags=("batches",),
    ),
    Operation(
        "get",
        "/batches/{batch_id}",
        "batch_status",
        "A batch's jobs and their statuses",
        (Answer(200, BatchView, "The batch", ("Cache-Control",)),),
        ("invalid_batch_id", "batch_not_found", "database_unavailable"),
        (BATCH_ID,),
        tags=("batches",),
    ),
    Operation(
        "get",
        "/dead-letters",
        "dead_letters",
        "What the reconciler drained from the dead-letter queues",
        (Answer(200, DeadLetterPage, "Dead letters, newest first"),),
        ("invalid_filter", "database_unavailable"),
        DEAD_LETTER_PARAMS,
        tags=("operations",),
    ),
    Operation(
        "post",
        "/dead-letters/replay",
        "replay_dead_letters",
        "Retry the jobs that dead letters failed",
        (Answer(200, ReplayResult, "The jobs queued again"),),
        ("invalid_filter", "database_unavailable"),
        DEAD_LETTER_PARAMS[:2],
        {"required": False, "content": {"application/json": {"schema": {"$ref": REF.format(model="ReplayRequest")}}}},
        tags=("operations",),
    ),
    Operation(
        "get",
        "/stats",
        "stats",
        "Job counts, throughput, latencies, workers and queue depths",
        (Answer(200, Stats, "The statistics", ("Cache-Control",)),),
        ("database_unavailable",),
        tags=("operations",),
    ),
    Operation(
        "get",
        "/health",
        "health",
        "Whether the database, storage and Service Bus answer",
        (
            Answer(200, Health, "Every check is ok", ("Cache-Control",)),
            Answer(503, Health, "A check failed", ("Retry-After", "Cache-Control")),
        ),
        (),
        anonymous=True,
        tags=("operations",),
    ),
    Operation(
        "get",
        "/openapi.json",
        "openapi",
        "This document",
        (Answer(200, OpenApiDocument, "OpenAPI 3.1"),),
        (),
        anonymous=True,
        tags=("operations",),
    ),
)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (ReplayRequest, SubmitByReference)


def document(problems: Mapping[str, tuple[int, str]], unavailable: Iterable[str]) -> dict[str, Any]:
    """The OpenAPI document. ``problems``: code → (status, title) (``functions.problems.PROBLEMS``);
    ``unavailable``: the 503 codes (the transient errors'). A code of :data:`OPERATIONS` in neither raises."""
    statuses = {code: status for code, (status, _) in problems.items()} | dict.fromkeys(unavailable, 503)
    titles = {code: title for code, (_, title) in problems.items()}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, statuses, titles)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Crop AI",
            "version": API_VERSION,
            "description": "Asynchronous crop-health analysis of satellite imagery. Errors are RFC 9457 "
            "application/problem+json with a stable `code`.",
        },
        "servers": [{"url": SERVER_URL}],
        "security": SECURITY,
        "paths": paths,
        "components": {"schemas": schemas(), "securitySchemes": _security_schemes()},
    }


def schemas() -> dict[str, Any]:
    """Every model's JSON Schema (serialisation for answers, validation for request bodies), shared ones once."""
    answers = {a.model for op in OPERATIONS for a in op.answers} | {Problem}
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "serialization") for m in answers]
    modes += [(m, "validation") for m in REQUEST_MODELS]
    _, defs = models_json_schema(sorted(modes, key=lambda m: m[0].__name__), ref_template=REF)
    found: dict[str, Any] = _markdown(defs.get("$defs", {}))
    return found


def _markdown(node: Any) -> Any:
    """Descriptions come from docstrings (reStructuredText): ``code`` and :role:`name` become Markdown `code`."""
    if isinstance(node, dict):
        return {
            k: _RST.sub(r"`\1`", v) if k == "description" and isinstance(v, str) else _markdown(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_markdown(v) for v in node]
    return node


def _operation(op: Operation, statuses: Mapping[str, int], titles: Mapping[str, str]) -> dict[str, Any]:
    responses: dict[str, Any] = {str(a.status): _answer(a) for a in op.answers}
    by_status: dict[int, list[str]] = {}
    for code in (*op.problems, "internal_error"):
        if code not in statuses:
            raise ValueError(f"{op.method.upper()} {op.path}: problem code {code!r} is not in the problem table")
        by_status.setdefault(statuses[code], []).append(code)
    for status, codes in sorted(by_status.items()):
        if str(status) in responses:
            raise ValueError(f"{op.method.upper()} {op.path}: {status} is both an answer and a problem ({codes})")
        responses[str(status)] = _problems(status, codes, titles)
    if not op.anonymous:
        responses["401"] = {"description": "No valid function key (x-functions-key header or code query parameter)"}
    spec: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": list(op.tags),
        "parameters": [_param(p) for p in op.params],
        "responses": dict(sorted(responses.items())),
    }
    if op.body is not None:
        spec["requestBody"] = op.body
    if op.anonymous:
        spec["security"] = []
    return spec


def _answer(answer: Answer) -> dict[str, Any]:
    return {
        "description": answer.description,
        "headers": {name: HEADERS[name] for name in answer.headers},
        "content": {"application/json": {"schema": {"$ref": REF.format(model=answer.model.__name__)}}},
    }


def _problems(status: int, codes: list[str], titles: Mapping[str, str]) -> dict[str, Any]:
    described = "; ".join(f"`{c}`" + (f" ({titles[c]})" if c in titles else "") for c in sorted(set(codes)))
    schema = {"allOf": [{"$ref": REF.format(model="Problem")}, {"properties": {"code": {"enum": sorted(set(codes))}}}]}
    headers = {"Retry-After": HEADERS["Retry-After"]} if status in (429, 503) else {}
    return {"description": described, "headers": headers, "content": {PROBLEM_TYPE: {"schema": schema}}}


def _param(param: Param) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": param.where,
        "required": param.required,
        "description": param.description,
        "schema": param.schema,
    }


def _security_schemes() -> dict[str, Any]:
    return {
        "functionKey": {"type": "apiKey", "in": "header", "name": "x-functions-key", "description": "A function key"},
        "functionKeyQuery": {"type": "apiKey", "in": "query", "name": "code", "description": "A function key"},
    }
