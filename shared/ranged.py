"""Reading a GeoTIFF's header by ranged reads, never the whole file (issue 12: uploads and images by reference).

:class:`RangeFile` is a read-only file over a :class:`RangeSource` (a blob read with the SDK's
``download_blob(offset, length)``, or an https URL read with ``Range`` requests) that fetches what GDAL asks for in
aligned chunks of :data:`CHUNK` bytes and keeps them: opening a GeoTIFF reads its 8 or 16 byte header, then the IFD
wherever the header says it lies, then the tag arrays (block offsets and sizes) wherever they lie, so a header at the
start of the file costs one request and one further in costs a request or two more ("growing" is GDAL's own seeking).
:func:`inspect_source` runs the same checks as :func:`shared.geotiff.inspect` does on bytes (magic, limits, every
block within the file, some block stored) with the file's real size, and gives the same codes.

An error of the source itself (the blob is gone, it changed, storage is down) is raised as it is, not as an
unreadable image: GDAL only sees a short read. It must never see the exception: a Python exception raised in a
rasterio ``opener`` file's ``read`` aborts the process (rasterio 1.4.4: ``std::length_error``, measured).
"""

from __future__ import annotations

import io
import warnings
from typing import Protocol

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from shared.geotiff import TIFF_MAGIC, ImageHeader, Limits, _check_complete, _check_has_data, _check_limits, _header
from shared.rejection import Rejected

CHUNK = 64 * 1024


class RangeSource(Protocol):
    """A file read by ranges: its size and the validator (ETag) every read is pinned to."""

    @property
    def size(self) -> int: ...

    @property
    def etag(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); raises if the file changed (``etag``)."""
        ...


class Chunks:
    """What was read of ``source``, in aligned :data:`CHUNK` blocks kept for the object's life. ``requests`` and
    ``fetched`` count what the source was asked for; ``error`` is the first error a read raised (GDAL turns it into
    a failed read: the caller re-raises it)."""

    def __init__(self, source: RangeSource, chunk: int = CHUNK) -> None:
        self.source, self._chunk = source, chunk
        self._held: dict[int, bytes] = {}
        self.requests = 0
        self.fetched = 0
        self.error: BaseException | None = None

    def range(self, start: int, end: int) -> bytes:
        first, last = start // self._chunk, (end - 1) // self._chunk
        missing = [i for i in range(first, last + 1) if i not in self._held]
        if missing:  # one request for the whole run of chunks not held yet
            offset = missing[0] * self._chunk
            length = min(self.source.size, (missing[-1] + 1) * self._chunk) - offset
            try:
                data = self.source.read(offset, length)
            except BaseException as e:
                self.error = self.error or e
                raise
            self.requests += 1
            self.fetched += len(data)
            for i in missing:
                self._held[i] = data[(i - missing[0]) * self._chunk : (i - missing[0] + 1) * self._chunk]
        joined = b"".join(self._held[i] for i in range(first, last + 1))
        return joined[start - first * self._chunk : end - first * self._chunk]


class RangeFile(io.RawIOBase):
    """A seekable read-only file over :class:`Chunks`, with a position of its own."""

    def __init__(self, chunks: Chunks) -> None:
        super().__init__()
        self._chunks = chunks
        self._size = chunks.source.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos or self._chunks.error is not None:
            return b""
        try:
            data = self._chunks.range(self._pos, end)
        except Exception:  # kept in Chunks.error: an exception must not reach GDAL (rasterio 1.4.4 aborts)
            return b""  # a short read: GDAL fails the open or the read, and the caller raises the error
        self._pos = end
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Opener:
    """What rasterio's ``opener`` needs to serve GDAL from Python files (rasterio >= 1.4), ``size`` included: a
    plain callable would make rasterio read the whole file to learn its size."""

    def __init__(self, chunks: Chunks) -> None:
        self._chunks = chunks

    def open(self, path: str, mode: str = "rb") -> RangeFile:
        return RangeFile(self._chunks)

    def isfile(self, path: str) -> bool:
        return True

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def size(self, path: str) -> int:
        return self._chunks.source.size


def inspect_source(source: RangeSource, limits: Limits, *, chunk: int = CHUNK) -> tuple[ImageHeader, Chunks]:
    """The header of the GeoTIFF ``source`` holds, read by ranges, checked as :func:`shared.geotiff.inspect`
    checks bytes (the same :class:`Rejected` codes); and what was read, for its counters."""
    chunks = Chunks(source, chunk)
    if source.size == 0:
        raise Rejected("empty_body", "the image is empty (0 bytes)")
    if source.size > limits.max_bytes:
        raise Rejected("payload_too_large", f"the image is {source.size} bytes; the limit is {limits.max_bytes}")
    if chunks.range(0, min(4, source.size)) not in TIFF_MAGIC:
        raise Rejected("not_a_tiff", "the image is not a TIFF file (its first bytes are not a TIFF signature)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with (
                rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
                rasterio.open("input.tif", opener=_Opener(chunks)) as ds,
            ):
                header = _header(ds)
                _check_limits(header, limits)
                _check_complete(ds, source.size)
                _check_has_data(ds)
    except (RasterioError, ValueError) as e:
        if chunks.error is not None:  # the source failed, not the image
            raise chunks.error from None
        raise Rejected("unreadable_image", f"the TIFF cannot be read: {e}") from e
    if chunks.error is not None:
        raise chunks.error
    return header, chunks
