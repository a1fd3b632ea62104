"""The HTTP server: stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive), one thread per connection.

The standard library is enough here: requests are small in number, every function call is blocking I/O (blob,
database, bus) and the server only has to frame requests and responses correctly. Bodies larger than the limit are
refused with 413 from ``Content-Length`` before a byte of them is read.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from local.functions_host.invoke import EventLoopThread, WireResponse, build_request, call, problem, to_wire
from local.functions_host.routes import RouteTable

logger = logging.getLogger(__name__)

DEFAULT_BODY_LIMIT = 100 * 1024 * 1024  # the Functions host's default request size limit


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class HostConfig:
    host: str = "127.0.0.1"
    port: int = 7071
    body_limit: int = DEFAULT_BODY_LIMIT
    enforce_keys: bool = False
    function_key: str | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the headers and the body go out as separate writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK (~40 ms per response, measured: status p50 48 ms -> 1.1 ms).
    disable_nagle_algorithm = True
    server_version = "crop-ai-functions-host"
    server: _Server

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

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_request

    def _dispatch(self) -> tuple[str, WireResponse]:
        table = self.server.table
        url = urlsplit(self.path)
        found = table.resolve(url.path, self.command)
        if found is None:
            self.close_connection = True  # the body, if any, is left unread
            return "-", problem(404, "Not Found", f"no function serves {self.command} {url.path}", "not_found")
        route, route_params = found
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        headers = self._headers()
        if self.server.config.enforce_keys and route.auth_level != "anonymous" and not self._key_ok(params, headers):
            self.close_connection = True
            return route.function_name, problem(401, "Unauthorized", "a valid function key is required", "unauthorized")
        try:
            body = self._read_body()
        except BodyTooLarge:
            self.close_connection = True
            limit = self.server.config.body_limit
            detail = f"the request body exceeds the host's limit of {limit} bytes"
            return route.function_name, problem(413, "Payload Too Large", detail, "request_too_large")
        except ValueError:  # a Content-Length or chunk size that is not a number
            self.close_connection = True
            detail = "the request's Content-Length or chunk framing is malformed"
            return route.function_name, problem(400, "Bad Request", detail, "malformed_request")
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

    def _read_body(self) -> bytes:
        limit = self.server.config.body_limit
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError(f"negative Content-Length {length}")
        if length > limit:
            raise BodyTooLarge
        return self.rfile.read(length) if length else b""

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > limit:
                raise BodyTooLarge
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _write(self, response: WireResponse) -> None:
        self.send_response(response.status)
        for key, value in response.headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: HostConfig, table: RouteTable) -> None:
        self.config = config
        self.table = table
        self.loop = EventLoopThread()
        super().__init__((config.host, config.port), _Handler)


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
