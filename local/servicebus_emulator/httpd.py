"""A minimal HTTP/1.1 server protocol on the broker's event loop: request framing, keep-alive, responses.

Enough for the management API's clients (azure-core's requests/urllib3 transport, curl): a request line, headers
and a body of ``Content-Length`` bytes; connections persist unless the request says ``Connection: close`` or is
HTTP/1.0. A request the protocol cannot frame (malformed, chunked, too large) is answered 4xx and the connection
closed, so a stray byte can never be read as the start of the next request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

__all__ = ["Handler", "HttpConnection", "Request", "Response"]

_LOGGER = logging.getLogger(__name__)
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query string, as sent
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/xml; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


class _Unframed(Exception):
    """The bytes are not a request this protocol can frame: answer ``status`` and close."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class HttpConnection(asyncio.Protocol):
    def __init__(
        self, handler: Handler, on_error: Callable[[int, str], Response], live: set[HttpConnection] | None = None
    ) -> None:
        self._handler = handler
        self._on_error = on_error  # builds the error response in the API's own format
        self._live = live if live is not None else set()  # the server's open connections, for shutdown
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self.transport is not None and not self.transport.is_closing():
            try:
                request = self._next_request()
            except _Unframed as exc:
                self._send(self._on_error(exc.status, str(exc)), close=True)
                return
            if request is None:
                return
            close = request.headers.get("connection", "").lower() == "close"
            try:
                response = self._handler(request)
            except Exception:  # the request's last word: a 500, the connection goes on
                _LOGGER.exception("management request failed: %s %s", request.method, request.target)
                response = self._on_error(HTTPStatus.INTERNAL_SERVER_ERROR, "The emulator failed on this request.")
            self._send(response, close=close)

    def _next_request(self) -> Request | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise _Unframed(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "The request head is too large.")
            return None
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Unframed(HTTPStatus.BAD_REQUEST, "Malformed request line.")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _Unframed(HTTPStatus.BAD_REQUEST, "Malformed header line.")
            headers[name.lower()] = value.strip()
        if parts[2] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        if "transfer-encoding" in headers:
            raise _Unframed(HTTPStatus.LENGTH_REQUIRED, "Chunked request bodies are not supported.")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _Unframed(HTTPStatus.BAD_REQUEST, "Malformed Content-Length.")
        length = int(length_text)
        if length > MAX_BODY:
            raise _Unframed(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.")
        if len(self._buffer) < end + 4 + length:
            return None
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        return Request(parts[0], parts[1], headers, body)

    def _send(self, response: Response, *, close: bool) -> None:
        assert self.transport is not None
        status = HTTPStatus(response.status)
        head = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: Microsoft-HTTPAPI/2.0",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        if close:
            head.append("Connection: close")
        self.transport.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + response.body)
        if close:
            self.transport.close()
