"""The local Functions host over real HTTP: a tiny FunctionApp defined here, served in-process and as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import azure.functions as func
import httpx
import pytest

from local.functions_host import FunctionsHost, HostConfig, RouteTable
from local.functions_host.routes import routes_of

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GUID = "0b5e4a8c-93a1-4f27-9a53-1c0f5e2d7a11"
LIMIT = 64 * 1024


def _app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="echo/{item_id:guid}", methods=["POST", "PUT"])
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        body = {
            "method": req.method,
            "url": req.url,
            "params": dict(req.params),
            "route_params": dict(req.route_params),
            "header": req.headers.get("x-test"),
            "size": len(req.get_body()),
        }
        return func.HttpResponse(json.dumps(body), status_code=201, mimetype="application/json")

    @app.route(route="async", methods=["GET"])
    async def in_coroutine(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("from a coroutine", headers={"Retry-After": "3"})

    @app.route(route="boom", methods=["GET"])
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("secret detail that must not leak")

    @app.route(route="secured", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
    def secured(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("in")

    return app


def _serve(config: HostConfig) -> Iterator[httpx.Client]:
    host = FunctionsHost(config, RouteTable(routes_of(_app()), "api"))
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=host.base_url, timeout=10) as client:
            yield client
    finally:
        host.shutdown()
        host.close()
        thread.join(5)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    yield from _serve(HostConfig(port=0, body_limit=LIMIT))


@pytest.fixture
def keyed_client() -> Iterator[httpx.Client]:
    yield from _serve(HostConfig(port=0, enforce_keys=True, function_key="k3y"))


def test_request_reaches_the_function_with_route_params(client: httpx.Client) -> None:
    response = client.post(f"/echo/{GUID}", params={"bands": "B04,B08"}, headers={"x-test": "yes"}, content=b"abc")
    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["method"] == "POST"
    assert body["params"] == {"bands": "B04,B08"}
    assert body["route_params"] == {"item_id": GUID}
    assert body["header"] == "yes"
    assert body["size"] == 3
    assert body["url"].endswith(f"/api/echo/{GUID}?bands=B04%2CB08")


def test_coroutine_functions_and_headers(client: httpx.Client) -> None:
    first = client.get("/async")
    second = client.get("/async")  # same keep-alive connection, same event loop
    assert (first.status_code, first.text, first.headers["retry-after"]) == (200, "from a coroutine", "3")
    assert second.text == "from a coroutine"
    assert first.headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nothing"), ("GET", f"/echo/{GUID}"), ("POST", "/echo/not-a-guid"), ("DELETE", "/async")],
)
def test_unknown_route_or_method_is_an_empty_404(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, content=b"ignored")
    assert (response.status_code, response.content) == (404, b"")  # as the Functions host answers: no body
    assert "content-type" not in response.headers


def test_outside_the_route_prefix_is_a_404(client: httpx.Client) -> None:
    response = client.get(str(client.base_url).removesuffix("/api/") + f"/echo/{GUID}")
    assert response.status_code == 404


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(client: httpx.Client, chunked: bool) -> None:
    data = b"\0" * (LIMIT + 1)
    content = iter([data[:1000], data[1000:]]) if chunked else data
    response = client.post(f"/echo/{GUID}", content=content)
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"


@pytest.mark.parametrize("size", [0, LIMIT], ids=["empty", "at-limit"])
def test_body_within_the_limit_arrives_whole(client: httpx.Client, size: int) -> None:
    response = client.put(f"/echo/{GUID}", content=b"\1" * size)
    assert response.json()["size"] == size


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: lots",
        "Content-Length: -5",
        "Content-Length: +5",
        "Content-Length: 3\r\nContent-Length: 4",
        "Content-Length: 3, 4",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: chunked",
    ],
)
def test_malformed_framing_is_a_400_problem(client: httpx.Client, framing: str) -> None:
    url = httpx.URL(str(client.base_url))
    body = b"zz\r\nnot hex\r\n" if framing == "Transfer-Encoding: chunked" else b"abcd"
    request = f"POST {url.raw_path.decode().rstrip('/')}/echo/{GUID} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n"
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(request.encode() + body)
        with sock.makefile("rb") as answer:
            status = answer.readline()
            headers = {}
            while (line := answer.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            problem = json.loads(answer.read(int(headers["content-length"])))
    assert status.split()[1] == b"400", status
    assert problem["code"] == "malformed_request"


def test_chunked_body_reaches_the_function_empty(client: httpx.Client) -> None:
    """The Functions host does not pass chunked bodies to out-of-process workers (azure-functions-host#7930)."""
    response = client.post(f"/echo/{GUID}", content=iter([b"ab", b"cde", b""]))
    assert response.json()["size"] == 0
    assert client.post(f"/echo/{GUID}", content=b"again").json()["size"] == 5  # the connection is still usable


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("bands=B04,B08", {"bands": "B04,B08"}),
        ("bands=", {}),
        ("bands", {}),
        ("bands=&scale=2", {"scale": "2"}),
        ("bands=B04&bands=B08", {"bands": "B04,B08"}),
        ("bands=B04&Bands=&BANDS=B08", {"bands": "B04,B08"}),
        ("a=x%20y&b=%2C", {"a": "x y", "b": ","}),
    ],
)
def test_query_reaches_the_function_as_the_host_passes_it(
    client: httpx.Client, query: str, params: dict[str, str]
) -> None:
    response = client.post(f"/echo/{GUID}?{query}")
    assert response.json()["params"] == params
    assert response.json()["url"].endswith(f"?{query}")


def test_function_exception_is_a_500_problem_without_details(client: httpx.Client) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "secret" not in response.text


def test_keys_not_enforced_by_default(client: httpx.Client) -> None:
    assert client.get("/secured").status_code == 200


@pytest.mark.parametrize(
    ("params", "headers", "status"),
    [
        ({}, {}, 401),
        ({"code": "wrong"}, {}, 401),
        ({"code": "k3y"}, {}, 200),
        ({}, {"x-functions-key": "k3y"}, 200),
    ],
)
def test_keys_enforced_when_asked(
    keyed_client: httpx.Client, params: dict[str, str], headers: dict[str, str], status: int
) -> None:
    assert keyed_client.get("/secured", params=params, headers=headers).status_code == status
    assert keyed_client.get("/async").status_code == 200  # anonymous functions stay open


def test_cli_serves_an_app_logs_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "tiny_app.py").write_text(
        textwrap.dedent(
            """
            import azure.functions as func

            app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

            @app.route(route="hello/{name}", methods=["GET"])
            def hello(req: func.HttpRequest) -> func.HttpResponse:
                return func.HttpResponse("hello " + req.route_params["name"])
            """
        )
    )
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": "v1"}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "local.functions_host", "--app", "tiny_app:app", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if "Functions host ready: " in line:
                url = line.split("Functions host ready: ", 1)[1].strip()
                break
        assert url is not None
        assert url.endswith("/v1")
        assert httpx.get(f"{url}/hello/world", timeout=10).text == "hello world"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
