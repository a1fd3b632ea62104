"""The local Functions host against hostile or broken clients, over raw sockets: stalled and trickling clients are
dropped within the read limits (and their threads released), every error the server detects itself is answered with
a status line and problem+json, ambiguous framing is a 400 and one answer, and a client that leaves early is no
traceback."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

import azure.functions as func
import pytest

from local.functions_host import FunctionsHost, HostConfig, RouteTable
from local.functions_host.deadline import ReadLimits
from local.functions_host.routes import routes_of

pytestmark = pytest.mark.integration

GUID = "0b5e4a8c-93a1-4f27-9a53-1c0f5e2d7a11"
LIMITS = ReadLimits(header_timeout=1.0, min_rate=240.0, grace=1.0, idle=1.0)
STALLED = 20  # connections of each kind


def _app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="echo/{item_id:guid}", methods=["POST"])
    def echo(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(json.dumps({"size": len(req.get_body())}), mimetype="application/json")

    @app.route(route="hello", methods=["GET"])
    def hello(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("hello")

    @app.route(route="slow", methods=["GET"])
    def slow(req: func.HttpRequest) -> func.HttpResponse:
        time.sleep(0.3)
        return func.HttpResponse(b"\0" * 4_000_000)

    return app


@pytest.fixture(scope="module")
def host() -> Iterator[FunctionsHost]:
    served = FunctionsHost(HostConfig(port=0, read_limits=LIMITS), RouteTable(routes_of(_app()), "api"))
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    yield served
    served.shutdown()
    served.close()
    thread.join(5)


def _connect(host: FunctionsHost) -> socket.socket:
    return socket.create_connection((host.config.host, host.port), timeout=10)


def _answer(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers and body of the one answer on ``sock``, read until the server closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in lines)}
    return status, headers, body


def _exchange(host: FunctionsHost, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    with _connect(host) as sock:
        sock.sendall(request)
        return _answer(sock)


def test_stalled_clients_are_dropped_and_their_threads_released(host: FunctionsHost) -> None:
    baseline = threading.active_count()
    silent = [_connect(host) for _ in range(STALLED)]
    headers_unfinished = [_connect(host) for _ in range(STALLED)]
    body_unfinished = [_connect(host) for _ in range(STALLED)]
    for sock in headers_unfinished:
        sock.sendall(f"POST /api/echo/{GUID} HTTP/1.1\r\nHost: x\r\n".encode())
    for sock in body_unfinished:
        sock.sendall(f"POST /api/echo/{GUID} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789".encode())
    started = time.monotonic()
    while threading.active_count() < baseline + 3 * STALLED and time.monotonic() - started < 5:
        time.sleep(0.05)
    peak = threading.active_count()
    while threading.active_count() > baseline + 2 and time.monotonic() - started < 10:
        time.sleep(0.05)
    released_after = time.monotonic() - started
    try:
        assert peak >= baseline + 3 * STALLED, (baseline, peak)  # one thread per connection while it lasts
        assert threading.active_count() <= baseline + 2, (baseline, threading.active_count())
        assert released_after < LIMITS.header_timeout + 2.5, released_after  # the timeout, plus the lingering close
        assert all(_answer(sock)[0] == b"" for sock in silent)  # an idle connection is closed without an answer
        for sock in headers_unfinished + body_unfinished:
            status, _, body = _answer(sock)
            assert status.startswith(b"HTTP/1.1 408 "), status
            assert json.loads(body)["code"] == "request_timeout"
    finally:
        for sock in silent + headers_unfinished + body_unfinished:
            sock.close()


def _status_or_reset(host: FunctionsHost) -> bytes:
    try:
        return _exchange(host, b"GET /api/hello HTTP/1.1\r\nConnection: close\r\n\r\n")[0]
    except ConnectionResetError:  # refused before its request was read
        return b""


def test_connections_past_the_limit_get_429_and_the_host_serves_again_once_they_close() -> None:
    served = FunctionsHost(HostConfig(port=0, max_connections=3), RouteTable(routes_of(_app()), "api"))
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    held = [_connect(served) for _ in range(3)]
    try:
        with _connect(served) as refused:  # answered at once, before it sends anything
            line, headers, body = _answer(refused)
        assert line == b"HTTP/1.1 429 Too Many Requests"
        assert (headers["content-type"], json.loads(body)["code"]) == ("application/problem+json", "too_many_requests")
        held.pop().close()
        deadline = time.monotonic() + 5
        while (line := _status_or_reset(served)) != b"HTTP/1.1 200 OK" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert line == b"HTTP/1.1 200 OK"
    finally:
        for sock in held:
            sock.close()
        served.shutdown()
        served.close()
        thread.join(5)


def test_a_trickling_request_is_cut_at_the_header_timeout(host: FunctionsHost) -> None:
    request = f"GET /api/hello HTTP/1.1\r\nHost: x\r\nX-Slow: {'a' * 100}\r\n\r\n".encode()
    started = time.monotonic()
    with _connect(host) as sock:
        try:
            for byte in request:  # one byte every 50 ms: each read is quick, the whole is too slow
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, _ = _answer(sock)
    assert status.startswith(b"HTTP/1.1 408 "), status
    assert time.monotonic() - started < LIMITS.header_timeout + 1.5


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed_request"),
        (b"GET /api/hello\r\n\r\n", 400, "malformed_request"),  # HTTP/0.9: no status line to answer with
        (b"G(T /api/hello HTTP/1.1\r\n\r\n", 400, "malformed_request"),
        (b"GET /api/hello HTTP/1.x\r\n\r\n", 400, "malformed_request"),
        (b"GET /api/hello HTTP/2.0\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET /api/hello HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /api/hello HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 431, "headers_too_large"),
    ],
    ids=["garbage", "http-0.9", "bad-method", "bad-version", "http-2", "long-url", "long-header", "many-headers"],
)
def test_errors_the_server_detects_are_problem_json(
    host: FunctionsHost, request_bytes: bytes, status: int, code: str
) -> None:
    line, headers, body = _exchange(host, request_bytes)
    assert line.startswith(f"HTTP/1.1 {status} ".encode()), line
    assert headers["content-type"] == "application/problem+json"
    assert (json.loads(body)["status"], json.loads(body)["code"]) == (status, code)
    assert b"<html" not in body.lower()


@pytest.mark.parametrize("method", ["TRACE", "BREW", "POST"])
def test_a_method_no_function_serves_is_an_empty_404(host: FunctionsHost, method: str) -> None:
    line, headers, body = _exchange(
        host, f"{method} /api/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert (line, headers["content-length"], body) == (b"HTTP/1.1 404 Not Found", "0", b"")


def test_conflicting_content_lengths_are_one_400_answer(host: FunctionsHost) -> None:
    smuggled = b"GET /api/hello HTTP/1.1\r\nHost: x\r\n\r\n"
    request = f"POST /api/echo/{GUID} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: {len(smuggled) + 3}"
    line, headers, body = _exchange(host, request.encode() + b"\r\n\r\nabc" + smuggled)
    assert line.startswith(b"HTTP/1.1 400 "), line
    assert headers["connection"] == "close"
    assert json.loads(body)["code"] == "malformed_request"  # one answer: the rest was not read as a request
    assert b"HTTP/1.1" not in body


def test_a_client_that_leaves_early_is_no_traceback(
    host: FunctionsHost, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="local.functions_host")
    for _ in range(3):
        sock = _connect(host)
        sock.sendall(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.close()
    deadline = time.monotonic() + 5
    while sum(r.__dict__.get("action") == "client_gone" for r in caplog.records) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [r for r in caplog.records if r.__dict__.get("action") == "client_gone"]
    assert len(gone) == 3
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in gone)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err
