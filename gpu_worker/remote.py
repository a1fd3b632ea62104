"""An outside ``image_url`` as the worker reads it (issue 12; docs/lifecycle.md, "Inputs by reference").

:func:`open_pinned` checks the host is still allowed, resolves it behind the SSRF guard (every address public), reads
its first range and checks the ETag and size the job was accepted with. :class:`PinnedUrl` then serves every read of
the analysis from that address (:class:`shared.http_range.HttpRange`: ``If-Match`` on each request, no redirects),
through rasterio's opener (:class:`shared.ranged.RangeOpener`): GDAL never resolves or fetches the URL itself, so
neither a redirect to an internal address nor DNS rebinding between the check and the reads reaches anything but
the checked address, and GDAL's process-wide ``/vsicurl/`` cache never holds an outside file. A failed read is the
job's error (:func:`shared.inputs.read_error`): 404 ``input_missing``, 412 ``input_changed``, a host down transient.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpcore

from shared.http_range import RangeRefused, connection_pool, open_url
from shared.inputs import (
    InputChanged,
    InputNotAllowed,
    InputRefused,
    Reference,
    SourceUnavailable,
    host_allowed,
    read_error,
)
from shared.ranged import CHUNK, Chunks, RangeOpener
from shared.rejection import Rejected

# What the analysis holds of an outside file at most (the least recently used chunks dropped first), and the most
# one read fetches ahead when GDAL reads through it in order (64 chunks of 64 KiB: 4 MiB).
HELD_BYTES = 64 * 1024 * 1024
AHEAD_CHUNKS = 64
# A read that failed on the network (5xx, 408, 429, no answer) is tried again, as /vsicurl/ does (max_retry=3):
# RETRIES more times, RETRY_DELAY seconds apart, doubling; then the attempt fails (transient: retried later).
RETRIES = 3
RETRY_DELAY = 1.0


class PinnedUrl:
    """:class:`shared.ranged.RangeSource` over an :class:`~shared.http_range.HttpRange`, its failures as the job's
    errors. Owns the connection pool (:meth:`close`); a read after :meth:`close` (a copy's thread left behind by a
    cancelled stage) fails at once instead of connecting again."""

    def __init__(self, url: str, pool: httpcore.ConnectionPool, *, allow_private: bool = False) -> None:
        self._pool = pool
        self._closed = False
        try:
            self._source, _ = open_url(url, pool, allow_private=allow_private)
        except RangeRefused as e:
            raise read_error(e.status, e.detail) from e
        except Rejected as e:  # image_url_not_allowed: it now resolves to a non-public address
            raise InputNotAllowed(f"image_url may not be read any more: {e.detail}") from e

    @property
    def size(self) -> int:
        return self._source.size

    @property
    def etag(self) -> str:
        return self._source.etag

    def read(self, offset: int, length: int) -> bytes:
        for attempt in range(RETRIES + 1):
            if self._closed:
                raise SourceUnavailable("image_url's reads were closed")
            try:
                return self._source.read(offset, length)
            except RangeRefused as e:
                error = read_error(e.status, e.detail)
                if not error.transient or attempt == RETRIES:
                    raise error from e
            except Rejected as e:
                raise InputRefused(e.detail) from e
            time.sleep(RETRY_DELAY * 2**attempt)
        raise AssertionError("unreachable")

    def opener(self) -> RangeOpener:
        """What rasterio's ``opener`` serves the analysis from: bounded, reading ahead in file order."""
        return RangeOpener(Chunks(self, CHUNK, limit=HELD_BYTES, ahead=AHEAD_CHUNKS))

    def close(self) -> None:
        self._closed = True
        self._pool.close()


def open_pinned(reference: Reference, allowed_hosts: tuple[str, ...], *, allow_private: bool = False) -> PinnedUrl:
    """The outside file of ``reference``, once known to be the version the job was accepted with.
    ``allow_private``: plain http and non-public addresses too (tests against a local server only)."""
    host = (urlsplit(reference.location).hostname or "").rstrip(".").lower()
    if not host_allowed(host, allowed_hosts):
        raise InputNotAllowed(f"host {host} is no longer among the hosts images may be read from")
    pool = connection_pool()
    try:
        source = PinnedUrl(reference.location, pool, allow_private=allow_private)
        if source.etag != reference.etag:
            raise InputChanged(f"image_url has ETag {source.etag}, the job was accepted with {reference.etag}")
        if source.size != reference.size:
            raise InputChanged(f"image_url is {source.size} bytes, the job was accepted with {reference.size}")
    except BaseException:
        pool.close()
        raise
    return source
