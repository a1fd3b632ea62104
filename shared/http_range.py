"""An https file read by ``Range`` requests (:class:`shared.ranged.RangeSource`), behind the webhooks' SSRF guard.

:func:`open_url` resolves the host and refuses it unless every address is public
(:func:`shared.webhooks.resolve_target`); every request then connects to *that* address (the URL names the IP, the
``Host`` header and TLS SNI name the host), so DNS rebinding cannot redirect a read. Redirects are never followed,
no proxy is used, a response body is read up to the range asked for. The first request (``bytes=0-65535``) gives
the size (``Content-Range``) and the ETag; each later one carries ``If-Match`` with that ETag (a 412 is
:class:`~shared.inputs.InputChanged`). A server that ignores ``Range`` (200) or gives no ETag is refused: the file
could be neither read in parts nor pinned. Any other failure is :class:`RangeRefused`, a ``Rejected``
(``image_unreachable`` at submit) that says what happened (``status``: the HTTP status, ``None`` for the network or a
short body): the worker tells a file gone from a host that is down (:func:`shared.inputs.read_error`).

This is the only way the worker reads an outside file, the analysis included (rasterio's opener:
:class:`shared.ranged.RangeOpener`): GDAL's ``/vsicurl/`` would resolve the host again and follow redirects.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpcore
import httpx

from shared.inputs import InputChanged
from shared.rejection import Rejected
from shared.webhooks import Refused, Target, resolve_target

TIMEOUT = 10.0
FIRST = 64 * 1024
_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol)


class RangeRefused(Rejected):
    """A ranged read that failed: ``status`` the HTTP status (412 is :class:`InputChanged` instead), ``None`` when no
    answer came (a timeout, a reset connection, a body shorter than the range)."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__("image_unreachable", detail)
        self.status = status


class HttpRange:
    def __init__(self, target: Target, pool: httpcore.ConnectionPool) -> None:
        self._target, self._pool = target, pool
        self.size = 0
        self.etag = ""
        self._first = b""

    def start(self) -> bytes:
        """The first :data:`FIRST` bytes; learns the size and the ETag."""
        status, headers, body = self._get(0, FIRST, None)
        if status != 206:
            raise RangeRefused(status, f"image_url answered HTTP {status} to a range request")
        total = headers.get("content-range", "").rpartition("/")[2]
        etag = headers.get("etag", "")
        if not total.isdigit() or not etag:
            raise RangeRefused(status, "image_url must answer ranged reads with Content-Range and an ETag")
        self.size, self.etag, self._first = int(total), etag, body
        return body

    def read(self, offset: int, length: int) -> bytes:
        if offset + length <= len(self._first):  # the first request's bytes: asked again by the chunk cache
            return self._first[offset : offset + length]
        status, _, body = self._get(offset, length, self.etag)
        if status == 412:
            raise InputChanged("image_url changed while it was read")
        if status != 206:
            raise RangeRefused(status, f"image_url answered HTTP {status} to a range request")
        if len(body) != min(length, self.size - offset):
            raise RangeRefused(None, f"image_url sent {len(body)} bytes of a {length} byte range at {offset}")
        return body

    def _get(self, offset: int, length: int, etag: str | None) -> tuple[int, dict[str, str], bytes]:
        target = self._target
        headers = [("host", target.host_header), ("range", f"bytes={offset}-{offset + length - 1}")]
        if etag:
            headers.append(("if-match", etag))
        extensions: dict[str, Any] = {
            "timeout": dict.fromkeys(("connect", "read", "write", "pool"), TIMEOUT),
            "sni_hostname": target.host,
        }
        try:
            with self._pool.stream("GET", target.pinned_url, headers=headers, extensions=extensions) as response:
                body = bytearray()  # grown in place: joining bytes part by part copies the body again each time
                if response.status == 206:
                    for part in response.iter_stream():
                        body += part
                        if len(body) > length:
                            raise RangeRefused(None, "image_url sent more than the range asked for")
                found = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
                return response.status, found, bytes(body)
        except _ERRORS as e:
            raise RangeRefused(None, f"image_url cannot be read: {type(e).__name__}") from e


def open_url(url: str, pool: httpcore.ConnectionPool, *, allow_private: bool = False) -> tuple[HttpRange, bytes]:
    """The file at ``url`` (already on the allow-list: :func:`shared.inputs.check_url`), opened by its first range.
    ``image_url_not_allowed`` for a non-public address, ``image_unreachable`` for one that cannot be read."""
    try:
        target = resolve_target(url, allow_private=allow_private)
    except Refused as e:
        raise Rejected("image_url_not_allowed", f"image_url: {e}") from e
    except OSError as e:
        raise RangeRefused(None, f"image_url's host does not resolve: {e}") from e
    source = HttpRange(target, pool)
    return source, source.start()


def connection_pool() -> httpcore.ConnectionPool:
    return httpcore.ConnectionPool(ssl_context=_tls(), max_connections=4)


@functools.cache
def _tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()
