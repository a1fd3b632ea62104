"""The OpenAPI document: every route the Function App registers is in it (and nothing else), with its methods and
its auth level; it is valid OpenAPI 3.1; its problem codes are exactly the problem table's; the answers the handlers
build validate against it; ``GET /api/openapi.json`` serves it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import azure.functions as func
import jsonschema
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from functions.openapi import openapi
from functions.problems import PROBLEMS, UNAVAILABLE_DETAILS
from shared.jobs import JobStatus
from shared.openapi import OPERATIONS, SERVER_URL, document
from shared.status import JobView, view_of
from tests.jobs import job_record

ROOT = Path(__file__).resolve().parents[2]
# What the Functions host indexes: the app's HTTP functions, read in a process of their own (``get_functions()``
# may run once per app, and the other unit tests call it).
ROUTES_SCRIPT = """
import json
from function_app import app
from local.functions_host.routes import routes_of
print(json.dumps([[r.template, sorted(r.methods), r.auth_level] for r in routes_of(app)]))
"""


@cache
def registered() -> list[tuple[str, list[str], str]]:
    done = subprocess.run(
        [sys.executable, "-c", ROUTES_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [(str(template), list(methods), str(auth)) for template, methods, auth in rows]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(PROBLEMS, UNAVAILABLE_DETAILS)


def _path(template: str) -> str:
    """A route template as an OpenAPI path: ``jobs/{job_id:guid}`` → ``/jobs/{job_id}``."""
    return "/" + re.sub(r"\{\*?(\w+)(?::\w+)?\??\}", r"{\1}", template.strip("/"))


def test_every_registered_route_is_documented_and_nothing_else(doc: dict[str, Any]) -> None:
    registered_ops = {(method.lower(), _path(t)) for t, methods, _ in registered() for method in methods}
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert documented == registered_ops


def test_anonymous_routes_need_no_key_and_the_others_a_function_key(doc: dict[str, Any]) -> None:
    anonymous = {(m.lower(), _path(t)) for t, methods, auth in registered() for m in methods if auth == "anonymous"}
    assert anonymous == {("get", "/health"), ("get", "/openapi.json")}
    assert doc["security"] == [{"functionKey": []}, {"functionKeyQuery": []}]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if (method, path) in anonymous:
                assert op["security"] == []
                assert "401" not in op["responses"]
            else:
                assert "security" not in op
                assert "401" in op["responses"]
    schemes = doc["components"]["securitySchemes"]
    assert (schemes["functionKey"]["in"], schemes["functionKey"]["name"]) == ("header", "x-functions-key")
    assert (schemes["functionKeyQuery"]["in"], schemes["functionKeyQuery"]["name"]) == ("query", "code")


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_server_url_is_the_route_prefix_of_host_json() -> None:
    prefix = json.loads((ROOT / "host.json").read_text())["extensions"]["http"]["routePrefix"]
    assert f"/{prefix}" == SERVER_URL


def _problem_codes(doc: dict[str, Any]) -> dict[str, set[int]]:
    """code → the statuses under which some operation documents it."""
    found: dict[str, set[int]] = {}
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op["responses"].items():
                media = response.get("content", {}).get("application/problem+json")
                if media is not None:
                    for code in media["schema"]["allOf"][1]["properties"]["code"]["enum"]:
                        found.setdefault(code, set()).add(int(status))
    return found


def test_problem_codes_are_exactly_the_problem_table_with_its_statuses(doc: dict[str, Any]) -> None:
    found = _problem_codes(doc)
    expected = {code: status for code, (status, _) in PROBLEMS.items()} | dict.fromkeys(UNAVAILABLE_DETAILS, 503)
    assert set(found) == set(expected), "a code answered by no documented route, or documented but not in PROBLEMS"
    assert {code: statuses for code, statuses in found.items() if statuses != {expected[code]}} == {}


def test_every_operation_documents_internal_errors_and_retry_after_on_503(doc: dict[str, Any]) -> None:
    for item in doc["paths"].values():
        for op in item.values():
            assert (
                "internal_error"
                in op["responses"]["500"]["content"]["application/problem+json"]["schema"]["allOf"][1]["properties"][
                    "code"
                ]["enum"]
            )
            if "503" in op["responses"]:
                assert "Retry-After" in op["responses"]["503"]["headers"]


def test_a_code_missing_from_the_problem_table_is_refused() -> None:
    table = {code: entry for code, entry in PROBLEMS.items() if code != "job_not_found"}
    with pytest.raises(ValueError, match="job_not_found"):
        document(table, UNAVAILABLE_DETAILS)


def test_operation_ids_are_the_function_names() -> None:
    ids = [op.operation_id for op in OPERATIONS]
    assert len(ids) == len(set(ids))


def _validator(doc: dict[str, Any], model: str) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        "urn:doc", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    schema = {"$ref": f"urn:doc#/components/schemas/{model}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


class _Signer:
    def read_url(self, blob_url: str, ttl: Any) -> str:
        return blob_url + "?sig=x"


@pytest.mark.parametrize(
    "fields",
    [
        {"status": JobStatus.QUEUED},
        {
            "status": JobStatus.RUNNING,
            "progress": {"stage": "analyse", "fraction": 0.5, "updated_at": datetime.now(UTC).isoformat()},
            "started_at": datetime.now(UTC),
            "cancel_requested_at": datetime.now(UTC),
        },
        {"status": JobStatus.SUCCEEDED, "result": {"outputs": {"ndvi_cog": "http://blob/x/ndvi.tif"}, "n": 1}},
        {"status": JobStatus.FAILED, "error_code": "invalid_image", "error_message": "not a GeoTIFF"},
    ],
    ids=["queued", "running", "succeeded", "failed"],
)
def test_job_views_as_the_handler_writes_them_validate(doc: dict[str, Any], fields: dict[str, Any]) -> None:
    body = view_of(job_record(**fields), _Signer(), ttl=None).body()  # type: ignore[arg-type]
    _validator(doc, "JobView").validate(json.loads(json.dumps(body)))
    assert JobView.model_validate(body).status == fields["status"]


def test_get_openapi_json_serves_the_document(doc: dict[str, Any]) -> None:
    response = openapi(func.HttpRequest("GET", "http://127.0.0.1:7071/api/openapi.json", body=b""))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert json.loads(response.get_body()) == doc
