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

:func:`copy_to` copies a whole source to a local file, ranges in parallel, stopping between ranges when asked (a
whole-scene job's input by reference, before its analysis: ``gpu_worker/handler.py``).

The worker's analysis of an outside ``image_url`` read by ranges reads the whole scene the same way
(:class:`RangeOpener`), with a bounded cache (``limit`` bytes, least recently used dropped first: a tile may be
gigabytes) and read-ahead: GDAL asks for one block at a time, in file order when it reads a scene through, so a miss
that starts where the last request ended fetches twice as many chunks as the last one did (up to ``ahead``), and a
run of blocks costs a few requests, not one each.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath
from typing import Protocol

import rasterio
from rasterio.abc import FileContainer
from rasterio.errors import RasterioError

from shared.geotiff import TIFF_MAGIC, ImageHeader, Limits, check_dataset
from shared.rejection import Rejected

CHUNK = 64 * 1024
# copy_to: ranges this long, this many at a time (32 MiB in flight).
COPY_RANGE = 8 * 1024 * 1024
COPY_THREADS = 4


class RangeSource(Protocol):
    """A file read by ranges: its size and the validator (ETag) every read is pinned to."""

    @property
    def size(self) -> int: ...

    @property
    def etag(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end); raises if the file changed (``etag``)."""
        ...


class CopyStopped(Exception):
    """:func:`copy_to` stopped before the end because it was asked to: the file is incomplete."""


def copy_to(source: RangeSource, path: Path, stop: threading.Event) -> None:
    """The whole of ``source`` into ``path``: ranges of :data:`COPY_RANGE` bytes, :data:`COPY_THREADS` at a time,
    each written at its offset, every one read as ``source`` reads (pinned to its ETag). Once ``stop`` is set, no
    range is begun: those under way end, then :class:`CopyStopped` (the SDK's own parallel download cannot be
    stopped once begun, and a cancelled job's input may be gigabytes). The first error of a read or a write stops the
    other threads the same way and is raised: the first in time (a transient error raised later by a thread still
    trying its range again does not hide a file that changed or a full disk)."""
    halt = threading.Event()
    offsets = iter(range(0, source.size, COPY_RANGE))
    lock = threading.Lock()
    errors: list[BaseException] = []  # in the order they were raised: the first one is the copy's

    def run(fd: int) -> None:
        try:
            while not (stop.is_set() or halt.is_set()):
                with lock:
                    offset = next(offsets, None)
                if offset is None:
                    return
                _write_at(fd, source.read(offset, min(COPY_RANGE, source.size - offset)), offset)
        except BaseException as e:
            with lock:
                errors.append(e)
            halt.set()  # the other threads begin no range after it

    with path.open("wb") as f, ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy") as pool:
        wait([pool.submit(run, f.fileno()) for _ in range(COPY_THREADS)])
    if errors:
        raise errors[0]
    if stop.is_set():
        raise CopyStopped(f"the copy to {path} was stopped")


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Chunks:
    """What was read of ``source``, in aligned :data:`CHUNK` blocks: all of them for the object's life, or at most
    ``limit`` bytes of them (the least recently used dropped first). ``ahead``: the most chunks one request fetches
    beyond what was asked for, when reads go through the file in order (0: none). ``requests`` and ``fetched`` count
    what the source was asked for; ``error`` is the first error a read raised (GDAL turns it into a failed read: the
    caller re-raises it). Thread-safe."""

    def __init__(self, source: RangeSource, chunk: int = CHUNK, *, limit: int | None = None, ahead: int = 0) -> None:
        self.source, self._chunk = source, chunk
        self._held: OrderedDict[int, bytes] = OrderedDict()
        self._most = None if limit is None else max(1, limit // chunk)
        self._ahead, self._run, self._next = ahead, 1, -1  # read-ahead: the last run's length, where it ended
        self._lock = threading.Lock()
        self.requests = 0
        self.fetched = 0
        self.error: BaseException | None = None

    def range(self, start: int, end: int) -> bytes:
        with self._lock:
            first, last = start // self._chunk, (end - 1) // self._chunk
            missing = [i for i in range(first, last + 1) if i not in self._held]
            for i in range(first, last + 1):
                if i in self._held:  # used again; what is fetched now (read ahead too) goes after it
                    self._held.move_to_end(i)
            if missing:  # one request for the whole run of chunks not held yet
                self._fetch(missing[0], missing[-1])
            parts = [self._held[i] for i in range(first, last + 1)]
            self._trim()
        joined = b"".join(parts)
        return joined[start - first * self._chunk : end - first * self._chunk]

    def _fetch(self, first: int, last: int) -> None:
        chunks = -(-self.source.size // self._chunk)
        if self._ahead and first == self._next:  # in file order: read ahead, twice the last run at most
            self._run = min(self._run * 2, self._ahead)
            last = max(last, min(chunks - 1, first + self._run - 1))
            while last > first and last in self._held:
                last -= 1
        else:
            self._run = last - first + 1
        offset = first * self._chunk
        length = min(self.source.size, (last + 1) * self._chunk) - offset
        try:
            data = self.source.read(offset, length)
        except BaseException as e:
            self.error = self.error or e
            raise
        self.requests += 1
        self.fetched += len(data)
        self._next = last + 1
        for i in range(first, last + 1):
            self._held[i] = data[(i - first) * self._chunk : (i - first + 1) * self._chunk]

    def _trim(self) -> None:
        while self._most is not None and len(self._held) > self._most:
            self._held.popitem(last=False)


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


class RangeOpener:
    """What rasterio's ``opener`` needs to serve GDAL from Python files (rasterio >= 1.4), ``size`` included: a
    plain callable would make rasterio read the whole file to learn its size. It holds one file, ``name`` (any
    folder: rasterio registers an opener by the folder of the path it opens, so two datasets open at the same time
    need two folders); GDAL's look for side-car files (``.msk``, ``.aux.xml``) finds nothing. ``error``: the
    source's first error (GDAL saw a short read)."""

    def __init__(self, chunks: Chunks, name: str = "input.tif") -> None:
        self._chunks, self._name = chunks, name

    @property
    def chunks(self) -> Chunks:
        return self._chunks

    @property
    def error(self) -> BaseException | None:
        return self._chunks.error

    def open(self, path: str, mode: str = "rb", **kwds: object) -> RangeFile:
        if not self.isfile(path) or "w" in mode:
            raise FileNotFoundError(path)
        return RangeFile(self._chunks)

    def isfile(self, path: str) -> bool:
        return PurePosixPath(path).name == self._name

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def rm(self, path: str) -> None:
        raise PermissionError(f"{path} is read-only")

    def size(self, path: str) -> int:
        if not self.isfile(path):
            raise FileNotFoundError(path)
        return self._chunks.source.size


FileContainer.register(RangeOpener)  # rasterio then calls its methods as they are (not as an fsspec filesystem's)


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
        with (
            rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"),
            rasterio.open("input.tif", opener=RangeOpener(chunks)) as ds,
        ):
            header = check_dataset(ds, source.size, limits)  # NotGeoreferencedWarning: filtered (shared.geotiff)
    except (RasterioError, ValueError) as e:
        if chunks.error is not None:  # the source failed, not the image
            raise chunks.error from None
        raise Rejected("unreadable_image", f"the TIFF cannot be read: {e}") from e
    if chunks.error is not None:
        raise chunks.error
    return header, chunks
