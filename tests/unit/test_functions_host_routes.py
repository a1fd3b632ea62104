"""Route templates and response conversion of the local Functions host (pure logic)."""

from __future__ import annotations

import json
from pathlib import Path

import azure.functions as func
import pytest

from local.functions_host.invoke import to_wire
from local.functions_host.routes import (
    RouteError,
    RouteTable,
    compile_template,
    load_max_outstanding_requests,
    load_route_prefix,
    routes_of,
)

PROBLEM = "application/problem+json"
GUID = "0b5e4a8c-93a1-4f27-9a53-1c0f5e2d7a11"


def _app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="jobs", methods=["POST"])
    def submit(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("submit")

    @app.route(route="jobs/{job_id:guid}", methods=["GET"])
    def status(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("status")

    @app.route(route="jobs/latest", methods=["GET"])
    def latest(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("latest")

    @app.function_name("files")
    @app.route(route="files/{*path}")
    def files(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("files")

    @app.route()
    def health(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("ok")

    return app


@pytest.fixture
def table() -> RouteTable:
    return RouteTable(routes_of(_app()), "api")


@pytest.mark.parametrize(
    ("method", "path", "function", "params"),
    [
        ("POST", "/api/jobs", "submit", {}),
        ("POST", "/API/Jobs/", "submit", {}),
        ("GET", f"/api/jobs/{GUID}", "status", {"job_id": GUID}),
        ("GET", f"/api/jobs/{GUID.upper()}", "status", {"job_id": GUID.upper()}),
        ("GET", "/api/jobs/latest", "latest", {}),
        ("DELETE", "/api/files/a/b%20c.tif", "files", {"path": "a/b c.tif"}),
        ("GET", "/api/files", "files", {}),
        ("GET", "/api/health", "health", {}),
    ],
)
def test_resolves_routes(table: RouteTable, method: str, path: str, function: str, params: dict[str, str]) -> None:
    found = table.resolve(path, method)
    assert found is not None
    assert (found[0].function_name, found[1]) == (function, params)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/jobs"),  # POST only
        ("GET", "/api/jobs/not-a-guid"),
        ("GET", f"/api/jobs/{GUID}/extra"),
        ("GET", f"/jobs/{GUID}"),  # no prefix
        ("GET", f"/other/jobs/{GUID}"),
        ("GET", "/api/nothing"),
    ],
)
def test_unknown_routes_and_methods_do_not_resolve(table: RouteTable, method: str, path: str) -> None:
    assert table.resolve(path, method) is None


def test_methods_default_to_all_and_auth_level_is_read() -> None:
    (health,) = [r for r in routes_of(_app()) if r.function_name == "health"]
    assert {"GET", "POST", "DELETE"} <= health.methods
    assert health.auth_level == "anonymous"
    assert health.binding_name == "req"


def test_empty_route_prefix() -> None:
    table = RouteTable(routes_of(_app()), "")
    found = table.resolve(f"/jobs/{GUID}", "GET")
    assert found is not None
    assert found[0].function_name == "status"


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("items/{id:int}", "items/42", {"id": "42"}),
        ("items/{id:int}", "items/x", None),
        ("items/{id?}", "items", {}),
        ("items/{id?}", "items/7", {"id": "7"}),
        ("{a}/{b:alpha}", "x/yz", {"a": "x", "b": "yz"}),
    ],
)
def test_template_constraints(template: str, path: str, expected: dict[str, str] | None) -> None:
    found = compile_template(template).fullmatch(path)
    assert (None if found is None else {k: v for k, v in found.groupdict().items() if v is not None}) == expected


@pytest.mark.parametrize("template", ["jobs/{id:regex(x)}", "jobs/{id:unknown}", "jobs/x{id}"])
def test_unsupported_templates_are_refused(template: str) -> None:
    with pytest.raises(RouteError):
        compile_template(template)


@pytest.mark.parametrize(
    ("content", "prefix"),
    [
        (None, "api"),
        ({}, "api"),
        ({"version": "2.0", "extensions": {"http": {"routePrefix": ""}}}, ""),
        ({"version": "2.0", "extensions": {"http": {"routePrefix": "v1"}}}, "v1"),
    ],
)
def test_route_prefix_from_host_json(tmp_path: Path, content: dict[str, object] | None, prefix: str) -> None:
    host_json = tmp_path / "host.json"
    if content is not None:
        host_json.write_text(json.dumps(content))
    assert load_route_prefix(host_json) == prefix


@pytest.mark.parametrize(
    ("content", "limit"),
    [
        (None, None),
        ({"version": "2.0"}, None),
        ({"extensions": {"http": {"maxOutstandingRequests": -1}}}, None),
        ({"extensions": {"http": {"maxOutstandingRequests": 200}}}, 200),
    ],
)
def test_max_outstanding_requests_from_host_json(
    tmp_path: Path, content: dict[str, object] | None, limit: int | None
) -> None:
    host_json = tmp_path / "host.json"
    if content is not None:
        host_json.write_text(json.dumps(content))
    assert load_max_outstanding_requests(host_json) == limit


@pytest.mark.parametrize(
    ("result", "status", "content_type", "body"),
    [
        (func.HttpResponse("hi"), 200, "text/plain; charset=utf-8", b"hi"),
        (func.HttpResponse(b"{}", status_code=202, mimetype="application/json"), 202, "application/json", b"{}"),
        (
            func.HttpResponse("x", headers={"Content-Type": "application/problem+json"}),
            200,
            "application/problem+json",
            b"x",
        ),
        (func.HttpResponse(status_code=204), 204, "text/plain; charset=utf-8", b""),
        ("text", 200, "text/plain; charset=utf-8", b"text"),
        (None, 204, None, b""),
    ],
)
def test_to_wire(result: object, status: int, content_type: str | None, body: bytes) -> None:
    wire = to_wire(result)
    headers = {k.lower(): v for k, v in wire.headers}
    assert (wire.status, headers.get("content-type"), wire.body) == (status, content_type, body)
