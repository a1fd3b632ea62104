"""The HTTP server: stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive), one thread per connection.

The standard library is enough here: requests are small in number, every function call is blocking I/O (blob,
database, bus) and the server only has to frame requests and responses correctly. Where the stdlib server and the
Functions host in Azure differ, this one answers as Azure does:

- body framing is checked first (:mod:`framing`): conflicting ``Content-Length`` values are a 400; a chunked body is
  read but the function gets an empty one (the host does not pass chunked bodies to out-of-process workers);
- the query reaches the function as the host passes it (:func:`invoke.host_params`): empty values dropped, a
  repeated name's values joined with ``,``;
- no function for the path and method (a wrong method included): 404 with an empty body;
- bodies over the limit are refused with 413 from ``Content-Length`` before a byte of them is read;
- reads are bounded (:mod:`deadline`): a request that stalls gets 408, an idle keep-alive connection is closed, so a
  stalled client holds a thread for a bounded time;
- every error the server detects itself (a malformed request line, headers too large, ...) is problem+json with a
  status line, never the stdlib's HTML page; a client that leaves early is a debug line, not a traceback.
"""

from __future__ import annotations

import hmac
import io
import logging
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from local.functions_host.deadline import DeadlineReader, ReadLimits
from local.functions_host.framing import BadFraming, BodyTooLarge, Framing, drain_chunked, framing_of, read_exactly
from local.functions_host.invoke import (
    EventLoopThread,
    WireResponse,
    build_request,
    call,
    host_params,
    problem,
    to_wire,
)
from local.functions_host.routes import RouteTable

logger = logging.getLogger(__name__)

DEFAULT_BODY_LIMIT = 100 * 1024 * 1024  # the Functions host's default request size limit
MAX_REQUEST_LINE = 65536
LINGER_SECONDS = 0.5  # closing a connection: how long, and how much, to read of what the client still sends
LINGER_BYTES = 1024 * 1024
ONE_WRITE_BYTES = 64 * 1024  # an answer's body up to this size goes out in the same write as its head
_METHOD = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token
# The ``code`` of each error the server detects itself.
_ERROR_CODES = {400: "malformed_request", 408: "request_timeout", 413: "request_too_large", 414: "uri_too_long"}
_ERROR_CODES |= {431: "headers_too_large", 505: "http_version_not_supported"}
_CLIENT_GONE = (ConnectionError, TimeoutError)
_BUSY_BODY = problem(429, "Too Many Requests", "the host is serving too many connections", "too_many_requests").body
_BUSY = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/problem+json\r\nRetry-After: 1\r\n"
_BUSY += b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)


@dataclass(frozen=True)
class HostConfig:
    host: str = "127.0.0.1"
    port: int = 7071
    body_limit: int = DEFAULT_BODY_LIMIT
    enforce_keys: bool = False
    function_key: str | None = None
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    # Connections served at once (each holds a thread); past it a new one gets 429 and is closed, as the host answers
    # past host.json's maxOutstandingRequests. None: unbounded.
    max_connections: int | None = None
    write_timeout: float = 30.0  # a client that does not read its answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the headers and the body go out as separate writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK (~40 ms per response, measured: status p50 48 ms -> 1.1 ms).
    disable_nagle_algorithm = True
    server_version = "crop-ai-functions-host"
    server: _Server
    reader: DeadlineReader
    _headers_buffer: list[bytes]  # the head being written (BaseHTTPRequestHandler's, from send_response on)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, self.server.config.read_limits)
        self.rfile = io.BufferedReader(self.reader)

    def handle(self) -> None:
        try:
            super().handle()
        except _CLIENT_GONE as e:
            logger.debug("client %s gone: %r", self.client_address[0], e, extra={"action": "client_gone"})

    def handle_one_request(self) -> None:
        self.command, self.request_version = None, self.protocol_version  # type: ignore[assignment]
        self.requestline = ""
        self.reader.expect_request()
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if self.raw_requestline in (b"\r\n", b"\n"):  # one empty line before a request is allowed (RFC 9112)
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except TimeoutError:
            self.close_connection = True
            if self.reader.received:  # a request had begun; nothing at all is an idle keep-alive connection
                self.send_error(HTTPStatus.REQUEST_TIMEOUT, "the request line did not arrive in time")
            return
        self.requestline = self.raw_requestline[:200].decode("latin-1").rstrip("\r\n")
        if not self.raw_requestline:
            self.close_connection = True
        elif len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, f"the request line is over {MAX_REQUEST_LINE} bytes")
        elif len(words := self.raw_requestline.split()) != 3 or not _METHOD.fullmatch(words[0].decode("latin-1")):
            self.send_error(HTTPStatus.BAD_REQUEST, "the request line is not 'METHOD target HTTP/1.x'")
        elif self._parse_request():
            self.do_request()

    def _parse_request(self) -> bool:
        try:
            return self.parse_request()  # on failure it has answered through send_error
        except TimeoutError:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "the request headers did not arrive in time")
            return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error the server detects itself: a status line and problem+json (never the stdlib's HTML page, nor,
        for a request line it could not read, an answer without a status line); the connection is then closed."""
        status = HTTPStatus(code)
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.request_version = self.protocol_version
        detail = (message or status.description)[:300]
        self._write(problem(status.value, status.phrase, detail, _ERROR_CODES.get(status.value, "bad_request")))

    def do_request(self) -> None:
        started = time.perf_counter()
        name, response = self._dispatch()
        self._write(response)
        logger.info(
            "%s %s -> %d (%s, %.1f ms)",
            self.command,
            self.path,
            response.status,
            name,
            (time.perf_counter() - started) * 1000,
            extra={"action": "http_request", "function": name, "status": response.status},
        )

    def _dispatch(self) -> tuple[str, WireResponse]:
        try:
            framing = framing_of(self.headers)
        except BadFraming as e:
            self.close_connection = True
            return "-", problem(400, "Bad Request", str(e), "malformed_request")
        self.close_connection = self.close_connection or framing.close
        url = urlsplit(self.path)
        found = self.server.table.resolve(url.path, self.command)
        if found is None:  # as the Functions host answers: 404, no body, a wrong method included
            self.close_connection = self.close_connection or framing.chunked or framing.length > 0  # body unread
            return "-", WireResponse(404, [], b"")
        route, route_params = found
        params = host_params(url.query)
        headers = self._headers()
        if self.server.config.enforce_keys and route.auth_level != "anonymous" and not self._key_ok(params, headers):
            self.close_connection = True
            return route.function_name, problem(401, "Unauthorized", "a valid function key is required", "unauthorized")
        try:
            body = self._read_body(framing)
        except BodyTooLarge:
            self.close_connection = True
            limit = self.server.config.body_limit
            detail = f"the request body exceeds the host's limit of {limit} bytes"
            return route.function_name, problem(413, "Payload Too Large", detail, "request_too_large")
        except BadFraming as e:
            self.close_connection = True
            return route.function_name, problem(400, "Bad Request", str(e), "malformed_request")
        except TimeoutError:
            self.close_connection = True
            detail = "the request body did not arrive in time"
            return route.function_name, problem(408, "Request Timeout", detail, "request_timeout")
        host = self.headers.get("Host") or f"{self.server.config.host}:{self.server.server_port}"
        request = build_request(self.command, f"http://{host}{self.path}", headers, params, route_params, body)
        try:
            return route.function_name, to_wire(call(route, request, self.server.loop))
        except Exception:
            logger.exception("function %s raised", route.function_name, extra={"action": "function_failed"})
            return route.function_name, problem(500, "Internal Server Error", "the function failed", "internal_error")

    def _headers(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for key, value in self.headers.items():
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return merged

    def _key_ok(self, params: dict[str, str], headers: dict[str, str]) -> bool:
        expected = self.server.config.function_key or ""
        given = params.get("code") or next((v for k, v in headers.items() if k.lower() == "x-functions-key"), "")
        return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())

    def _read_body(self, framing: Framing) -> bytes:
        """The body the function gets: empty for a chunked one, which is read and dropped, as in Azure."""
        limit = self.server.config.body_limit
        if framing.length > limit:
            raise BodyTooLarge
        self.reader.expect_body()
        if framing.chunked:
            drain_chunked(self.rfile, limit)
            return b""
        return read_exactly(self.rfile, framing.length) if framing.length else b""

    def _write(self, response: WireResponse) -> None:
        self.connection.settimeout(self.server.config.write_timeout)
        self.send_response(response.status)
        for key, value in response.headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # end_headers() with a small body in the same write: the answer leaves in one segment, and the client wakes
        # up once for it instead of once for the head and again for the body. A large body is not copied.
        body = b"" if self.command == "HEAD" else response.body
        self._headers_buffer.append(b"\r\n")
        if len(body) <= ONE_WRITE_BYTES:
            self._headers_buffer.append(body)
        self.flush_headers()
        if len(body) > ONE_WRITE_BYTES:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: HostConfig, table: RouteTable) -> None:
        self.config = config
        self.table = table
        self.loop = EventLoopThread()
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._busy_logged = -(10.0**9)
        super().__init__((config.host, config.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = self.config.max_connections is not None and self._connections >= self.config.max_connections
            self._connections += 0 if full else 1
        if full:  # answered from the accepting thread, without reading the request
            self._log_busy(client_address)
            try:  # without blocking: send, stop sending, read what the request has sent so far (else a reset)
                request.setblocking(False)
                request.send(_BUSY)
                request.shutdown(socket.SHUT_WR)
                for _ in range(16):
                    if not request.recv(65536):
                        break
            except OSError:
                pass
            self.close_request(request)
            return
        super().process_request(request, client_address)

    def _log_busy(self, client_address: Any) -> None:
        """A warning at most every 10 s (a flood of connections is no flood of log lines); debug otherwise."""
        now = time.monotonic()
        level = logging.WARNING if now - self._busy_logged >= 10 else logging.DEBUG
        self._busy_logged = now if level == logging.WARNING else self._busy_logged
        limit, client = self.config.max_connections, client_address[0]
        logger.log(level, "%s connections open: refusing %s with 429", limit, client, extra={"action": "busy"})

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections -= 1

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        """Close gracefully: stop sending, then read what the client is still sending (an unread body, the rest of an
        oversized line) for a moment, so that closing does not reset the connection before it has read the answer."""
        if isinstance(request, socket.socket):
            try:
                request.shutdown(socket.SHUT_WR)
                request.settimeout(LINGER_SECONDS)
                deadline, drained = time.monotonic() + LINGER_SECONDS, 0
                while drained < LINGER_BYTES and time.monotonic() < deadline and (data := request.recv(65536)):
                    drained += len(data)
            except OSError:
                pass
        self.close_request(request)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        """What escapes a handler: a client gone is a debug line; anything else is logged, never printed."""
        error = sys.exc_info()[1]
        if isinstance(error, _CLIENT_GONE):
            logger.debug("client %s gone: %r", client_address, error, extra={"action": "client_gone"})
        else:
            logger.error("error serving %s", client_address, exc_info=error, extra={"action": "host_error"})


class FunctionsHost:
    """Serve ``table`` on ``config.host:config.port`` (port 0: a free one; see ``port`` once constructed)."""

    def __init__(self, config: HostConfig, table: RouteTable) -> None:
        self._server = _Server(config, table)
        self.config = config
        self.table = table

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def loop(self) -> EventLoopThread:
        """The event loop that coroutine functions run on (timer functions share it); closed by ``close``."""
        return self._server.loop

    @property
    def base_url(self) -> str:
        prefix = f"/{self.table.prefix}" if self.table.prefix else ""
        return f"http://{self.config.host}:{self.port}{prefix}"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop serving (from another thread than ``serve_forever``'s) and release the socket."""
        self._server.shutdown()

    def close(self) -> None:
        self._server.server_close()
        self._server.loop.close()
